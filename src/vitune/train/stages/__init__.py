"""The training stages, one file each, and the table that maps a stage name to its code.

    sft  stages/sft.py  supervised fine-tuning on instructions or conversations
    pt   stages/pt.py   continued pretraining on raw text (streamed or not)
    rm   stages/rm.py   a reward model on preference pairs
    dpo  stages/dpo.py  preference optimisation (DPO, IPO, hinge, ORPO, SimPO, KTO)
    rl   stages/rl.py   reinforcement learning from rewards (TRL's GRPO, RLOO; PPO in train/ppo.py)

Each is a `vitune.train.stage.Stage` run by the shared runner (vitune.train.runner). The names,
their one-line summaries and their own config sections are the config's stage table
(vitune.config.STAGE_INFO), which sits below this package; adding a stage is one file here, one
entry below and one row there (a test checks that the two agree).
"""

from __future__ import annotations

from vitune.config import STAGE_INFO, RunConfig
from vitune.train.stage import Stage
from vitune.train.stages.dpo import DpoStage
from vitune.train.stages.pt import PretrainStage
from vitune.train.stages.rl import RlStage
from vitune.train.stages.rm import RmStage
from vitune.train.stages.sft import SftStage

STAGES: dict[str, Stage] = {stage.name: stage for stage in (SftStage(), PretrainStage(), RmStage(), DpoStage(), RlStage())}

if list(STAGES) != list(STAGE_INFO):  # pragma: no cover - a stage added in one table and not the other
    raise ImportError(f"vitune.train.stages has {list(STAGES)}, vitune.config.STAGE_INFO {list(STAGE_INFO)}")


def stage_for(config: RunConfig) -> Stage:
    """The Stage of config.train.stage."""
    return STAGES[config.train.stage]
