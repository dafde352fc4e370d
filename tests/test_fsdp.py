"""FSDP2 scale-out, proven on 2 CPU processes (gloo) with real `vitune train --nproc 2` runs:
each rank holds half of the parameters and of AdamW's state (sharding.json), the losses are
those of one process with the same global batch, a run killed with kill -9 after a sharded
checkpoint resumes exactly, and the run ends in an ordinary model folder that plain
transformers / PEFT load in one process. DeepSpeed ZeRO-2/3 (when installed) are held to the
same losses, with each rank's share of AdamW's state read from its checkpoint files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitune.cli import main
from vitune.train.checkpoint import MARKER

from conftest import ROOT, write_config
from test_resume import losses, same_weights, wait_for

STEPS = 6
SAVE_STEPS = 3
FSDP2 = ROOT / "examples" / "fsdp" / "fsdp2.yaml"  # state_dict_type: SHARDED_STATE_DICT
TINY_LLAMA_PARAMETERS = 5_048_576  # vitune init-model --arch llama


def run_config(tmp_path: Path, model: Path, out: Path, method: str = "full", **train) -> Path:
    """A run whose every step is exactly comparable across process counts.

    Packing fixes the bins (32 rows -> 16 bins of 256 tokens) before any sampling, and the
    seeded sampler orders them the same way for any number of processes. accelerate gives
    rank r the r-th bin of each global batch, which is what one process with gradient
    accumulation 2 takes as its two micro-batches: each micro-batch is one bin of the same
    shape in both runs, and Trainer divides by the trained tokens of the whole global batch
    (summed across ranks). 6 steps x 2 bins stay inside the first epoch, so no rank pads a
    short last batch. fp32 throughout (no GPU); the same optimizer (adamw_torch) everywhere.
    No LoRA dropout: every rank draws its masks from the same seed, one process draws the
    second micro-batch's masks after the first's.
    """
    return write_config(
        tmp_path / f"{out.name}.yaml",
        model={"name_or_path": str(model)},
        method={"type": method, **({"lora": {"dropout": 0.0}} if method == "lora" else {})},
        data={"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 32}], "max_length": 256},
        train={"max_steps": STEPS, "micro_batch_size": 1, "learning_rate": 1e-3, "optimizer": "adamw_torch",
               "output_dir": str(out), "logging_steps": 1, "report_to": ["none"], **train},
    )


def two_processes(config: Path) -> None:
    assert main(["train", str(config), "--nproc", "2"]) == 0


def max_difference(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys() == set(range(1, STEPS + 1))
    return max(abs(a[step] - b[step]) for step in a)


def consolidated_checkpoint(checkpoint: Path, tmp_path: Path) -> dict:
    """The sharded (torch.distributed.checkpoint) model of an FSDP checkpoint, as one state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", target)
    return torch.load(target, weights_only=True)["model"]


@pytest.fixture(scope="module")
def one_process(tiny_llama, tmp_path_factory) -> Path:
    """The reference: one process, micro-batch 1 x gradient accumulation 2 (the same global batch)."""
    tmp = tmp_path_factory.mktemp("one")
    out = tmp / "one-process"
    assert main(["train", str(run_config(tmp, tiny_llama, out, gradient_accumulation=2))]) == 0
    return out


@pytest.fixture(scope="module")
def sharded(tiny_llama, tmp_path_factory) -> Path:
    """Full fine-tuning with FSDP2 on 2 CPU processes, sharded checkpoints at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out = tmp / "fsdp"
    two_processes(run_config(tmp, tiny_llama, out, fsdp=str(FSDP2), save_steps=SAVE_STEPS))
    return out


def test_each_rank_holds_half_of_the_parameters_and_of_adamw_state(sharded):
    full = TINY_LLAMA_PARAMETERS
    assert json.loads((sharded / "sharding.json").read_text()) == {
        "engine": "fsdp",
        "world_size": 2,
        "parameters": {"full": full, "per_rank": [full // 2, full // 2]},
        "trainable_parameters": {"full": full, "per_rank": [full // 2, full // 2]},
        # AdamW keeps exp_avg and exp_avg_sq, each the size of the parameters, each sharded
        "optimizer_state": {"full": 2 * full, "per_rank": [full, full]},
    }


def test_two_sharded_processes_give_the_losses_of_one(sharded, one_process):
    assert max_difference(losses(sharded), losses(one_process)) < 1e-5


def test_the_run_ends_in_an_ordinary_model_folder_with_the_trained_weights(sharded, one_process, tmp_path):
    from transformers import AutoModelForCausalLM

    assert {"config.json", "model.safetensors"} <= {p.name for p in sharded.iterdir()}
    assert not list(sharded.glob("pytorch_model_fsdp*"))  # sharded files only inside checkpoints
    saved = load_file(sharded / "model.safetensors")
    # the final weights are the sharded state training ended with (checkpoint-6), bit for bit
    last = consolidated_checkpoint(sharded / f"checkpoint-{STEPS}", tmp_path)
    assert saved.keys() == last.keys() and all(torch.equal(saved[k], last[k]) for k in saved)
    # and those of the same training in one process, up to the order in which gloo sums gradients
    reference = load_file(one_process / "model.safetensors")
    assert saved.keys() == reference.keys()
    assert max(float((saved[k] - reference[k]).abs().max()) for k in saved) < 1e-4
    # plain transformers loads it in one process: ordinary tensors, every parameter
    model = AutoModelForCausalLM.from_pretrained(sharded)
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == TINY_LLAMA_PARAMETERS


def start_two_processes(config: Path) -> subprocess.Popen:
    """`vitune train CONFIG --nproc 2` as a user starts it (its output is a few kB: the pipe never fills)."""
    return subprocess.Popen([sys.executable, "-m", "vitune", "train", str(config), "--nproc", "2"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_9_run(proc: subprocess.Popen) -> None:
    """SIGKILL to every process of the run at once, then wait until all are gone.

    torchrun starts each rank in a session of its own, so a signal to the launcher's process
    group would leave the ranks training on: the kill goes to the whole process tree.
    """
    import psutil

    launcher = psutil.Process(proc.pid)
    run = [launcher, *launcher.children(recursive=True)]
    assert len(run) >= 4, run  # vitune --nproc 2 -> accelerate launch (torchrun) -> 2 ranks
    for process in run:
        process.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(run, timeout=30)
    assert not alive, alive


@pytest.mark.slow  # ~43 s; CI keeps the other sharded runs (parameters and AdamW state halved, LoRA under FSDP)
def test_kill_9_after_a_sharded_checkpoint_then_resume_gives_the_same_losses(sharded, tiny_llama, tmp_path):
    out = tmp_path / "killed"
    config = run_config(tmp_path, tiny_llama, out, fsdp=str(FSDP2), save_steps=SAVE_STEPS)
    proc = start_two_processes(config)
    wait_for(out / f"checkpoint-{SAVE_STEPS}" / MARKER, proc, timeout=300)
    kill_9_run(proc)
    assert not (out / "summary.json").exists()
    checkpoint = out / f"checkpoint-{SAVE_STEPS}"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # torch.distributed.checkpoint: one file per rank
        assert {p.name for p in (checkpoint / part).iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}

    assert main(["train", str(config), "--nproc", "2", "--set", "train.resume=auto"]) == 0
    after = {s: loss for s, loss in losses(out).items() if s > SAVE_STEPS}
    uninterrupted = {s: loss for s, loss in losses(sharded).items() if s > SAVE_STEPS}
    assert after.keys() == uninterrupted.keys() == set(range(SAVE_STEPS + 1, STEPS + 1))
    assert max(abs(after[s] - uninterrupted[s]) for s in after) < 1e-5
    assert sorted(losses(out)) == list(range(1, STEPS + 1))  # each step logged once
    assert same_weights(out, sharded)  # bit for bit


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
def test_lora_under_fsdp_shards_the_adapter_and_ends_in_a_plain_adapter_folder(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    one, two = tmp_path / "lora-one", tmp_path / "lora-two"
    assert main(["train", str(run_config(tmp_path, tiny_llama, one, "lora", gradient_accumulation=2))]) == 0
    two_processes(run_config(tmp_path, tiny_llama, two, "lora", fsdp=str(FSDP2), save_steps=SAVE_STEPS))

    report = json.loads((two / "sharding.json").read_text())
    adapter = report["trainable_parameters"]["full"]
    assert report["trainable_parameters"]["per_rank"] == [adapter // 2, adapter // 2]
    assert report["optimizer_state"] == {"full": 2 * adapter, "per_rank": [adapter, adapter]}
    assert max_difference(losses(two), losses(one)) < 1e-5

    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in two.iterdir()}
    assert not (two / "model.safetensors").exists()
    saved, reference = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert saved.keys() == reference.keys() and sum(t.numel() for t in saved.values()) == adapter
    assert max(float((saved[k] - reference[k]).abs().max()) for k in saved) < 1e-5
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), two)
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


def deepspeed_config(stage: int, tmp_path: Path) -> Path:
    """The shipped ZeRO-2 config; for ZeRO-3 the shipped one without CPU offload (everything is
    on the CPU already, and offload would JIT-compile DeepSpeed's CPU Adam for minutes)."""
    if stage == 2:
        return ROOT / "examples" / "deepspeed" / "zero2.json"
    settings = json.loads((ROOT / "examples" / "deepspeed" / "zero3_offload.json").read_text())
    for key in ("offload_optimizer", "offload_param"):
        del settings["zero_optimization"][key]
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(settings), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu_partitions_adamw_state_and_gives_the_losses_of_one_process(stage, one_process,
                                                                                          tiny_llama, tmp_path):
    """DeepSpeed's CPU accelerator runs ZeRO over gloo (its first run compiles a small shared-memory
    op, ~3 min on 2 cores, cached in ~/.cache/torch_extensions)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / f"zero{stage}"
    two_processes(run_config(tmp_path, tiny_llama, out, deepspeed=str(deepspeed_config(stage, tmp_path)),
                             save_steps=STEPS))
    assert max_difference(losses(out), losses(one_process)) < 1e-5
    # each rank's optimizer file holds AdamW's state of its half of the (flattened) parameters
    for rank in (0, 1):
        files = out / f"checkpoint-{STEPS}" / f"global_step{STEPS}"
        saved = torch.load(files / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        saved = saved["optimizer_state_dict"]
        adam = (saved["base_optimizer_state"] if stage == 2 else saved["optimizer_state_dict"])["state"].values()
        assert sum(s["exp_avg"].numel() for s in adam) == sum(s["exp_avg_sq"].numel() for s in adam) \
            == TINY_LLAMA_PARAMETERS // 2
        if stage == 3:  # ZeRO-3 partitions the (fp32) parameters themselves too
            assert sum(t.numel() for t in saved["fp32_flat_groups"]) == TINY_LLAMA_PARAMETERS // 2
    # the end of the run gathers the whole model (a collective under ZeRO-3) into an ordinary folder
    saved, reference = load_file(out / "model.safetensors"), load_file(one_process / "model.safetensors")
    assert saved.keys() == reference.keys()
    assert max(float((saved[k] - reference[k]).abs().max()) for k in reference) < 1e-4


def test_auto_optimizer_under_fsdp_is_adamw_torch_and_bitsandbytes_ones_are_refused():
    from vitune.config import validate_config
    from vitune.errors import UserError
    from vitune.models.optimizers import resolve_optimizer
    from vitune.train.arguments import resolve_scale_out

    assert resolve_optimizer("auto", fsdp=True) == ("adamw_torch", None)
    config = validate_config({"model": {"name_or_path": "m"}, "data": {"train": [{"path": "x"}]},
                              "train": {"fsdp": str(FSDP2), "optimizer": "adamw_bnb_8bit"}})
    with pytest.raises(UserError) as error:
        resolve_scale_out(config)
    assert str(error.value) == (
        "train.optimizer = adamw_bnb_8bit cannot update FSDP's sharded parameters (bitsandbytes optimizers "
        "take plain tensors); use train.optimizer: adamw_torch (or auto) with train.fsdp")


def test_full_state_dict_checkpoints_are_refused_in_one_line(tmp_path):
    from vitune.config import validate_config
    from vitune.errors import UserError
    from vitune.train.arguments import resolve_scale_out

    fsdp = tmp_path / "full.yaml"
    fsdp.write_text(FSDP2.read_text().replace("SHARDED_STATE_DICT", "FULL_STATE_DICT"), encoding="utf-8")
    config = validate_config({"model": {"name_or_path": "m"}, "data": {"train": [{"path": "x"}]},
                              "train": {"fsdp": str(fsdp)}})
    with pytest.raises(UserError) as error:
        resolve_scale_out(config)
    assert str(error.value) == (
        f"train.fsdp = {fsdp}: fsdp_config.state_dict_type FULL_STATE_DICT checkpoints cannot be resumed; use "
        "SHARDED_STATE_DICT (examples/fsdp/fsdp2.yaml, from `vitune examples copy fsdp/fsdp2`): the final model folder is whole either way")
