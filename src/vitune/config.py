"""The schema of one run: a YAML file in four sections (model, method, data, train), plus the
sections a stage or a feature adds (dpo, rl, eval).

`load_config(path, overrides)` reads the YAML, applies `--set a.b=value` overrides and
validates it. Every mistake becomes one `ConfigError` line naming the key path, the bad
value and what is allowed (or the nearest valid key). Rules across fields raise; nothing
here quietly rewrites what the user wrote. One default depends on another key: an unset
train.learning_rate is the method's (`LEARNING_RATES`), filled in here, so config.yaml and
--dry-run show the number the run trains with.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitune.errors import ConfigError


def cache_home() -> Path:
    """Where vitune caches prepared data and converted models: $VITUNE_CACHE_DIR or ~/.cache/vitune."""
    return Path(os.environ.get("VITUNE_CACHE_DIR") or os.path.expanduser(os.path.join("~", ".cache", "vitune")))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks: what cache entries are keyed by."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- model


class ModelConfig(Section):
    name_or_path: str = Field(description="Hub id (org/name) or local model folder.")
    template: str = Field(
        "auto",
        description="Chat template: auto (the tokenizer's own) or a built-in name "
        "(llama2, llama3, mistral, chatml, vistral, vinallama, vicuna, vietcuna, gemma, alpaca).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: auto = bfloat16 on a GPU that supports it, else float32."
    )
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager", "flex_attention"] = Field(
        "auto",
        description="auto = flash_attention_2 on a GPU when flash-attn is installed, else sdpa. With packing, "
        "sdpa attends row by row and flash_attention_2 uses its varlen kernel; eager and flex_attention "
        "use transformers' mask built from the position ids.",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a Hub model (its own modelling files); off: that code "
        "would run with your permissions."
    )
    allow_pickle: bool = Field(
        False, description="Also load weights stored as pickle files (*.bin, *.pt, *.pth, *.ckpt, *.pkl) when a "
        "model, adapter or checkpoint has no safetensors; off: loading pickle can run arbitrary code."
    )
    adapter: Optional[str] = Field(
        None, description="A LoRA adapter to start from: an earlier run folder (e.g. runs/my-sft) or adapter "
        "folder whose base is name_or_path. It is trained further, and it is the reference model of the dpo and "
        "rl stages (not the bare base). Needs method.type lora or qlora; the adapter's own LoRA settings apply."
    )


# ---------------------------------------------------------------- method


class LoraSettings(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="all-linear or a list of module names such as [q_proj, v_proj]."
    )
    modules_to_save: Optional[list[str]] = Field(
        None, description="Modules trained in full beside the adapter, e.g. [embed_tokens, lm_head]."
    )
    train_tokens: Optional[Union[Literal["new"], list[int]]] = Field(
        None,
        description="Embedding rows trained beside the adapter, saved small (PEFT trainable tokens): `new` = "
        "the rows `vitune vocab extend` added (from the model folder's vocab_report.json), or a list of token "
        "ids. With tied embeddings the output rows train with them.",
    )


class QuantizationSettings(Section):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class MethodConfig(Section):
    type: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings)


@dataclass(frozen=True)
class LearningRates:
    """A method's learning rates: the default of an unset train.learning_rate, the range the docs
    recommend, and the wider one outside which `vitune train` advises (vitune.train.guidance)."""

    label: str  # the method in words
    default: float
    recommended: tuple[float, float]
    usual: tuple[float, float]


# Every stage (sft, pt, rm, dpo, rl) starts from its method's: a LoRA adapter starts at zero and needs
# about ten times the rate that moves a whole pretrained model.
LEARNING_RATES: dict[str, LearningRates] = {
    "lora": LearningRates("LoRA", 2e-4, (1e-4, 3e-4), (5e-5, 5e-4)),
    "qlora": LearningRates("QLoRA", 2e-4, (1e-4, 3e-4), (5e-5, 5e-4)),
    "full": LearningRates("full fine-tuning", 2e-5, (1e-5, 2e-5), (5e-6, 1e-4)),
}


# ---------------------------------------------------------------- data

DataFormat = Literal["auto", "alpaca", "sharegpt", "messages", "text", "preference", "unpaired"]


class DatasetSpec(Section):
    path: str = Field(description="A local .json/.jsonl/.csv/.parquet file, or a Hub dataset name.")
    format: DataFormat = "auto"
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Renamed fields, canonical -> yours, e.g. {instruction: question, output: answer}.",
    )
    split: str = "train"
    weight: float = Field(1.0, gt=0)
    max_samples: Optional[int] = Field(None, gt=0)


class NormalizeSettings(Section):
    unicode: Literal["NFC", "NFKC", "none"] = "NFC"
    vi_tone: Literal["keep", "new", "old"] = "keep"


class DataConfig(Section):
    train: list[DatasetSpec] = Field(min_length=1)
    eval: Optional[list[DatasetSpec]] = None
    val_size: float = Field(0.0, ge=0, description="Fraction (<1) or count (>=1) of rows held out for evaluation.")
    max_length: int = Field(2048, gt=1)
    overflow: Literal["drop", "truncate"] = Field(
        "drop", description="Rows longer than max_length: drop them (counted) or truncate them."
    )
    packing: bool = Field(
        True,
        description="Pack rows end to end into bins of max_length tokens (best fit), so no compute goes to "
        "padding; attention never crosses rows. micro_batch_size then counts bins. Architectures that "
        "cannot take row boundaries (BLOOM) train padded.",
    )
    train_on_prompt: bool = False
    mask_history: bool = False
    system_prompt: Literal["keep", "fold", "drop"] = Field(
        "keep",
        description="System prompts in the data: keep (a system turn, where the template writes it), fold "
        "(into the first user turn, a blank line after it: for templates that take none, such as Gemma's) "
        "or drop (removed). Folded and dropped prompts are counted in the data report.",
    )
    normalize: NormalizeSettings = Field(default_factory=NormalizeSettings)
    on_error: Literal["raise", "skip"] = "raise"
    num_proc: Optional[int] = Field(None, gt=0)
    streaming: bool = Field(
        False,
        description="train.stage pt only: read, tokenise and pack the corpus on the fly with bounded memory, each "
        "process reading its own share (local .jsonl / .txt files, in order); needs train.max_steps. Held-out "
        "text comes from data.eval (read whole).",
    )
    cache: bool = Field(True, description="Reuse prepared data when files, tokenizer, template and settings are unchanged.")
    cache_dir: Optional[str] = Field(None, description="Where prepared data is cached (default ~/.cache/vitune, or $VITUNE_CACHE_DIR).")

    @model_validator(mode="after")
    def _eval_sources_exclusive(self) -> "DataConfig":
        if self.eval and self.val_size:
            raise ValueError("give either data.eval or data.val_size, not both")
        return self


# ---------------------------------------------------------------- train


@dataclass(frozen=True)
class StageInfo:
    """What the config knows of a training stage. This table is the one list of stages: the config,
    `vitune train --help`, the web UI's menu and the docs read it, and vitune.train.stages maps each
    name to the file that trains it (one file per stage)."""

    name: str
    summary: str  # one line, for help texts, the UI and the docs
    section: Optional[str] = None  # the config section only this stage reads (dpo, rl)
    section_required: str = ""  # the stage cannot run without its section: what it must hold, for the error
    language_model: bool = True  # trains a causal LM (false for rm: a scalar head), so the eval section can score it
    streaming: bool = False  # reads data.streaming


STAGE_INFO: dict[str, StageInfo] = {s.name: s for s in (
    StageInfo("sft", "supervised fine-tuning on instructions or conversations"),
    StageInfo("pt", "continued pretraining on raw text (text rows, .txt files)", streaming=True),
    StageInfo("rm", "a reward model trained on preference pairs", language_model=False),
    StageInfo("dpo", "preference optimisation: DPO, IPO, hinge, ORPO, SimPO, KTO (the dpo section picks the loss)",
              section="dpo"),
    StageInfo("rl", "reinforcement learning from rewards: GRPO, RLOO, PPO (the rl section)", section="rl",
              section_required="at least one reward, e.g. rl: {rewards: [{function: examples.rewards:vietnamese}]}"),
)}
StageName = Literal[tuple(STAGE_INFO)]


def makes_reward_model(stage: str | None) -> bool:
    """Whether a run of this stage (a run folder's summary.json names it) is a reward model, not a causal LM."""
    return stage in STAGE_INFO and not STAGE_INFO[stage].language_model


class TrainConfig(Section):
    stage: StageName = Field(
        "sft", description="; ".join(f"{s.name}: {s.summary}" for s in STAGE_INFO.values()) + ".",
    )
    epochs: float = Field(3.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    micro_batch_size: int = Field(4, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    learning_rate: Optional[float] = Field(
        None, gt=0,
        description="Peak learning rate. Unset: 2e-4 for lora and qlora, 2e-5 for full fine-tuning (the run's "
        "config.yaml shows the number used). Usual: LoRA/QLoRA 1e-4..3e-4, full fine-tuning 1e-5..2e-5.",
    )
    optimizer: Literal[
        "auto", "adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
        "adafactor", "sgd",
    ] = Field(
        "auto",
        description="auto = adamw_bnb_8bit when bitsandbytes is installed (a quarter of AdamW's state memory), "
        "else adamw_torch. 8-bit and paged optimizers (bitsandbytes) cut optimizer memory.",
    )
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_checkpointing: Union[Literal["auto"], bool] = Field(
        "auto",
        description="Recompute activations in the backward pass to save memory (~30% slower). auto: off on "
        "the CPU; on a GPU, checkpoint only as many layers as needed to fit in its memory.",
    )
    liger_kernel: Union[Literal["auto"], bool] = Field(
        "auto",
        description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy): "
        "auto = on a GPU when liger-kernel is installed (pip install 'vitune[gpu]') and the architecture "
        "is supported (Llama, Mistral, Qwen2, ...).",
    )
    seed: int = 42
    output_dir: str = "runs/vitune"
    overwrite: bool = Field(False, description="Replace an existing output_dir instead of refusing.")
    save_steps: Optional[int] = Field(None, gt=0)
    save_total_limit: Optional[int] = Field(None, gt=0)
    eval_steps: Optional[int] = Field(None, gt=0)
    logging_steps: Optional[int] = Field(
        None, gt=0,
        description="Log the loss (metrics.jsonl, progress bar, tensorboard) every this many optimizer steps. Unset: "
        "about 20 points per run, at most every 10 steps (a 6-step run logs every step, a 100-step run every 5th). "
        "The first and the last step are always logged.",
    )
    resume: Union[bool, str] = Field(
        False,
        description="false = start fresh; auto = the newest complete checkpoint in output_dir (fresh if none); "
        "or the path of a checkpoint folder.",
    )
    resume_strict: bool = Field(
        True, description="Refuse to resume when data, model, tokenizer, max_length or packing changed."
    )
    deepspeed: Optional[str] = Field(None, description="DeepSpeed config JSON, e.g. examples/deepspeed/zero2.json.")
    fsdp: Optional[str] = Field(None, description="FSDP settings YAML, e.g. examples/fsdp/fsdp2.yaml.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers that get every logged figure (loss, tokens/s, padding, held-out and eval "
        "figures, the summary) and the run's config: tensorboard (the run folder's tensorboard/), wandb (Weights & "
        "Biases: pip install 'vitune[wandb]'), mlflow (pip install 'vitune[mlflow]'), several at once, or none. "
        "Where they write is set by their environment variables (WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI, "
        "MLFLOW_EXPERIMENT_NAME, ...).",
    )
    run_name: Optional[str] = Field(
        None, min_length=1,
        description="The run's name in the trackers (W&B, MLflow). Unset: the name of train.output_dir's folder.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_as_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # --set train.report_to=wandb

    @field_validator("report_to")
    @classmethod
    def _trackers_once_and_none_alone(cls, value: list[str]) -> list[str]:
        if "none" in value and len(value) > 1:
            raise ValueError("none turns every tracker off; give it alone, or list only the trackers to use")
        for name in value:
            if value.count(name) > 1:
                raise ValueError(f"{name} is listed twice; list each tracker once")
        return value

    @model_validator(mode="after")
    def _resume_value(self) -> "TrainConfig":
        if self.resume is True:
            raise ValueError("train.resume: true is ambiguous; write auto (newest checkpoint) or a checkpoint path")
        if self.deepspeed and self.fsdp:
            raise ValueError("give either train.deepspeed or train.fsdp, not both")
        return self


# ---------------------------------------------------------------- stages


class DpoConfig(Section):
    loss: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo", "kto"] = Field(
        "sigmoid",
        description="sigmoid: DPO (Rafailov et al. 2023); ipo: IPO (Azar et al. 2023); hinge: SLiC's hinge loss "
        "(Zhao et al. 2023); orpo: ORPO, no reference (Hong et al. 2024); simpo: SimPO, no reference (Meng et "
        "al. 2024); kto: KTO, also on unpaired rows (Ethayarajh et al. 2024).",
    )
    beta: float = Field(0.1, gt=0, description="Strength of the preference term (ORPO: its lambda; SimPO: its beta, "
                        "usually 2 to 10).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid and simpo only: the share of pairs assumed "
                                   "mislabelled (conservative DPO).")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo only: the target reward margin gamma.")
    desirable_weight: float = Field(1.0, gt=0, description="kto only: weight of the desirable (chosen) answers.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto only: weight of the undesirable (rejected) answers.")
    precompute_reference: bool = Field(
        False, description="Compute the reference log-probabilities once before training, so no reference forward "
        "runs during it (and full fine-tuning needs no second copy of the model).")


class RewardSource(Section):
    model: Optional[str] = Field(None, description="A vitune reward-model run folder (train.stage: rm).")
    function: Optional[str] = Field(None, description="A Python function as module:function, given the prompt and "
                                    "the completion (strings), returning a float.")
    weight: float = Field(1.0, description="Weight of this reward in the sum.")

    @model_validator(mode="after")
    def _one_source(self) -> "RewardSource":
        if bool(self.model) == bool(self.function):
            raise ValueError("give each reward either model: (a reward-model run) or function: (module:function)")
        return self


GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")
# the rl keys one algorithm reads; given with another algorithm they are an error, not ignored
PPO_KEYS = ("ppo_epochs", "num_mini_batches", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
            "kl_estimator", "target_kl")
GRPO_KEYS = ("loss_type", "importance_sampling_level")


class RlConfig(Section):
    algorithm: Literal["grpo", "rloo", "ppo"] = Field(
        "grpo", description="grpo: GRPO (Shao et al. 2024) and rloo: RLOO (Ahmadian et al. 2024), both through TRL; "
        "ppo: classic PPO with a value head, GAE and a per-token KL penalty (InstructGPT's RLHF step), vitune's own.")
    rewards: list[RewardSource] = Field(min_length=1, description="Rewards, summed with their weights.")
    num_generations: int = Field(4, ge=1, description="Completions sampled per prompt (grpo and rloo compare them "
                                 "within the group: at least 2; ppo: any).")
    max_completion_length: int = Field(128, gt=0)
    beta: float = Field(0.04, ge=0, description="Weight of the KL penalty to the reference model (0: none, and no "
                        "reference forward). ppo: per token, in the reward.")
    temperature: float = Field(1.0, gt=0)
    # grpo: the loss's variant (TRL's GRPOConfig)
    loss_type: Optional[Literal[GRPO_LOSSES]] = Field(
        None, description="grpo: how token losses are averaged. grpo: per completion, then over completions (length "
        "bias); dr_grpo: divided by a constant (max_completion_length); dapo: over every token of the step (TRL's "
        "default); bnpo: over the tokens of each micro-batch; cispo: clips the importance weights, not the update; "
        "sapo: a soft gate instead of the hard clip. Unset: TRL's default (dapo).")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="grpo: token = one importance ratio per token (GRPO); sequence = one per completion, the "
        "mean of its tokens' log-ratios (GSPO, Zheng et al. 2025; pair it with loss_type: grpo).")
    # ppo
    ppo_epochs: int = Field(4, ge=1, description="ppo: passes over each rollout batch.")
    num_mini_batches: int = Field(1, ge=1, description="ppo: optimizer updates per pass; each takes this fraction "
                                  "of the rollout batch (train.micro_batch_size must be a multiple).")
    cliprange: float = Field(0.2, gt=0, description="ppo: the policy ratio's clip range (epsilon).")
    cliprange_value: float = Field(0.2, gt=0, description="ppo: the value prediction's clip range around the "
                                   "rollout's value.")
    vf_coef: float = Field(0.1, ge=0, description="ppo: weight of the value loss beside the policy loss.")
    gamma: float = Field(1.0, ge=0, le=1, description="ppo: discount per token.")
    lam: float = Field(0.95, ge=0, le=1, description="ppo: GAE's lambda (1: Monte-Carlo returns, 0: one-step TD).")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="ppo: the per-token KL penalty's estimator: k1 = "
                                              "log pi - log ref (InstructGPT); k3 = never negative, lower variance.")
    target_kl: Optional[float] = Field(None, gt=0, description="ppo: stop a rollout's updates early once the mean "
                                       "KL between the policy and the rollout's policy exceeds this (unset: never).")

    @model_validator(mode="after")
    def _algorithm_keys(self) -> "RlConfig":
        own = {"ppo": PPO_KEYS, "grpo": GRPO_KEYS, "rloo": ()}[self.algorithm]
        for key in sorted(self.model_fields_set & set(PPO_KEYS + GRPO_KEYS) - set(own)):
            users = "ppo" if key in PPO_KEYS else "grpo"
            raise ValueError(f"rl.{key} is only used with rl.algorithm: {users} (this run is {self.algorithm})")
        if self.algorithm != "ppo" and self.num_generations < 2:
            raise ValueError(f"rl.num_generations = {self.num_generations}: {self.algorithm} compares each prompt's "
                             "completions with each other; give at least 2")
        return self


# ---------------------------------------------------------------- evaluation while training

EvalTask = Literal["auto", "multiple_choice", "conversations", "text", "preference"]


class EvalConfig(Section):
    """What `vitune eval` would score, scored on the model being trained: before the first step,
    every train.eval_steps steps (without it: only before and after training) and after the last."""

    data: list[str] = Field(min_length=1, description="Data files, as for vitune eval --data: multiple choice "
                            "(VMLU's format), conversations / Alpaca rows, plain text or preference pairs.")
    task: EvalTask = Field("auto", description="As vitune eval --task: auto = each file's rows decide.")
    generate: bool = Field(False, description="Conversations: also generate greedy answers and score exact match, "
                           "chrF and ROUGE-L (as vitune eval --generate; slower).")
    shots: int = Field(0, ge=0, description="Multiple choice: k solved questions of the same subject before each one.")
    limit: Optional[int] = Field(100, gt=0, description="Rows scored per file at each evaluation (the first ones; "
                                 "null: all). Every evaluation scores them all, so keep it small.")
    max_new_tokens: int = Field(64, gt=0, description="Longest generated answer (generate: true).")
    batch_size: int = Field(8, gt=0, description="Sequences per forward pass of the evaluation.")


class RunConfig(Section):
    model: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    rl: Optional[RlConfig] = None
    eval: Optional[EvalConfig] = None

    @model_validator(mode="after")
    def _method_learning_rate(self) -> "RunConfig":
        if self.train.learning_rate is None:
            self.train.learning_rate = LEARNING_RATES[self.method.type].default
            self.train.model_fields_set.discard("learning_rate")  # still the default: the user wrote none
        return self

    @model_validator(mode="after")
    def _method_rules(self) -> "RunConfig":
        if self.method.type != "qlora" and "quantization" in self.method.model_fields_set:
            raise ValueError("method.quantization is only used with method.type: qlora")
        if self.method.type == "full" and "lora" in self.method.model_fields_set:
            raise ValueError("method.lora is only used with method.type: lora or qlora")
        if self.model.adapter and self.method.type == "full":
            raise ValueError("model.adapter continues a LoRA adapter; use method.type: lora or qlora with it")
        if self.model.adapter and "lora" in self.method.model_fields_set:
            raise ValueError("model.adapter brings its own LoRA settings; remove method.lora")
        stage = STAGE_INFO[self.train.stage]
        for other in STAGE_INFO.values():  # a section of a stage's own belongs to that stage only
            given = other.section in self.model_fields_set and getattr(self, other.section) is not None
            if other.section and given and other is not stage:
                raise ValueError(f"the {other.section} section is only used with train.stage: {other.name} "
                                 f"(this run is stage {stage.name})")
        if stage.section_required and getattr(self, stage.section) is None:
            raise ValueError(f"train.stage: {stage.name} needs an {stage.section} section with {stage.section_required}")
        if self.eval is not None:
            if not stage.language_model:
                raise ValueError(f"the eval section scores a language model (vitune eval's tasks); {stage.summary} "
                                 f"(train.stage: {stage.name}) is scored on held-out pairs: give them as data.eval")
            if self.train.fsdp:
                # rank 0 evaluates alone, and FSDP shards every weight across the ranks
                raise ValueError("the eval section cannot run with train.fsdp (the weights are sharded across "
                                 "processes); evaluate the finished run with vitune eval instead")
        if self.data.streaming:
            if not stage.streaming:
                raise ValueError("data.streaming is for continued pretraining (train.stage: "
                                 f"{'/'.join(s.name for s in STAGE_INFO.values() if s.streaming)}), not stage {stage.name}")
            if self.train.max_steps is None:
                raise ValueError("data.streaming needs train.max_steps: a stream has no length to count epochs in")
            if self.data.val_size:
                raise ValueError("data.val_size cannot hold rows out of a stream; give held-out text as data.eval")
        return self


def config_schema() -> dict:
    """The run config's JSON Schema (what `vitune config schema` prints): every key with its type,
    default and description, unknown keys refused, for the YAML language server in editors."""
    schema = RunConfig.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "vitune run config"}


# ---------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `key.path=value` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (give the path of a YAML file; `vitune examples list` "
                          "shows ready ones, `vitune examples copy quickstart .` puts one here)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 at byte {exc.start}; save the config as UTF-8") from None
    except RecursionError:  # PyYAML parses nesting recursively: [[[[... thousands deep
        raise ConfigError(f"{path}: nested too deeply to be a run config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        # a reader error has no `problem`; its text goes on with a second line of position
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with sections model, method, data, train")
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw, source=str(path))


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 1e-4, true, [a, b] work)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: write it as key.path=value, e.g. --set train.learning_rate=1e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    except RecursionError:  # PyYAML parses nesting recursively: [[[[... thousands deep
        raise ConfigError(f"--set {key.strip()}: the value is nested too deeply to be a config value") from None
    # YAML 1.1 reads 1e-4 as a string; numbers are what users mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} is a list of {len(node)} item(s); address one as {'.'.join(parts[:depth])}.0")
            if last:
                node[int(part)] = value
                return
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} is a value, not a section")


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_first_problem(exc, source)) from None


def _first_problem(exc: ValidationError, source: str) -> str:
    err = exc.errors(include_url=False)[0]
    loc = err["loc"]
    key = _key_path(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        hint = _nearest_key(err["loc"])
        suggestion = f"; did you mean '{hint}'?" if hint else f"; valid keys here: {', '.join(_keys_at(err['loc'][:-1]))}"
        return f"{source}: unknown key '{key}'{suggestion}"
    if kind == "missing":
        return f"{source}: missing required key '{key}'"
    value = err.get("input")
    if kind == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        return f"{source}: {key} = {value!r} is not allowed; expected {allowed}"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error" and err.get("ctx", {}).get("error") is not None and isinstance(value, dict):
        # a rule across the fields of a section
        prefix = f"{key}: " if key and not msg.startswith(key + ".") else ""
        return f"{source}: {prefix}{msg}"
    where = f"{key} = {value!r}" if key else "config"
    return f"{source}: {where}: {msg[0].lower() + msg[1:]}"


def _key_path(loc: tuple) -> str:
    """('data', 'train', 0, 'path') -> 'data.train[0].path'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the keys at a location such as ('data', 'train', 0)."""
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        if field is None:
            return None
        model = _inner_model(field.annotation)
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found:
            return found
    return None


def _keys_at(loc: tuple) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _nearest_key(loc: tuple) -> str | None:
    parent, bad = loc[:-1], str(loc[-1])
    # a valid key put in the wrong section
    for section in RunConfig.model_fields:
        model = _model_at((section,))
        if model and bad in model.model_fields and (section,) != tuple(parent):
            return f"{section}.{bad}"
    match = difflib.get_close_matches(bad, _keys_at(parent), n=1, cutoff=0.5)
    return _key_path((*parent, match[0])) if match else None


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config.yaml of a run folder (every default written out), read back: the
    sections its method and stage do not use were written as defaults and are dropped again."""
    path = Path(run_dir) / "config.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a run config (damaged?); restore it from the run")
    method, train = raw.get("method") or {}, raw.get("train") or {}
    if method.get("type") != "qlora":
        method.pop("quantization", None)
    if method.get("type") == "full":
        method.pop("lora", None)
    own = STAGE_INFO.get(train.get("stage", "sft"))
    for info in STAGE_INFO.values():  # sections of other stages were written as defaults
        if info.section and info is not own:
            raw.pop(info.section, None)
    for optional in ("rl", "eval"):
        if raw.get(optional) is None:
            raw.pop(optional, None)
    return validate_config(raw, source=str(path))


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML, every default written out."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
