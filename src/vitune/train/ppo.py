"""Classic PPO for language models (`rl.algorithm: ppo`): InstructGPT's RLHF step, SFT -> reward
model -> PPO, as a Trainer on vitune's shared runner.

One optimizer step of the runner is one PPO iteration over the step's prompt rows
(train.micro_batch_size x train.gradient_accumulation x processes of them, one completion each; the
data holds every prompt `rl.num_generations` times, shuffled, so an epoch samples it that often):

1. rollout: every process samples completions for its prompts with the shared rollout engine
   (vitune.train.rollouts), each row from its own seed (run seed, step, row), so a completion
   does not depend on the batch it is sampled in, the process, or a resume;
2. score: the rewards of `rl.rewards` (Python functions, vitune reward models), summed with
   their weights, on the completion without its end-of-turn marker;
3. the rollout's log-probabilities and values (the value head reads the last hidden state that
   the LM head reads: with LoRA it shares the adapted base, with full fine-tuning the trained
   model), and the reference's log-probabilities: the adapter disabled (a new LoRA/QLoRA adapter),
   a frozen copy of `model.adapter` (an SFT run: the reference is that SFT model), or a frozen copy
   of the model (full fine-tuning);
4. per-token rewards (-beta x KL, and the score on the last token), GAE (gamma, lambda), returns,
   advantages whitened over the whole rollout (every process);
5. `rl.ppo_epochs` passes over the rollout, each in `rl.num_mini_batches` updates (clipped policy
   loss + vf_coef x clipped value loss, a mean over the update's tokens on every process), stopped
   early once the policy has moved more than `rl.target_kl` from the rollout's.

The updates happen inside the step (each clips its gradient and steps the optimizer); transformers'
own optimizer step after it finds no gradient and changes nothing, and the learning-rate schedule
moves once per iteration. The formulas are vitune.train.ppo_math's.

The value head is saved beside the model as value_head.safetensors (checkpoints and the run
folder), never inside it: the run folder stays an ordinary model (or adapter) for chat, merge and
export. N processes train exactly what one process trains at the same global batch and
train.micro_batch_size (each process samples its own prompts; the updates' means and the
whitening are over every process).
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer

from vitune.config import RlConfig
from vitune.train import ppo_math as F
from vitune.train.rollouts import row_seeds, sample_completions
from vitune.train.shares import FILLER, ExactSharesMixin, split_batch
from vitune.train.trainer import VituneTrainerMixin

VALUE_HEAD = "value_head.safetensors"
REFERENCE_ADAPTER = "ref"  # the frozen copy of model.adapter (TRL's GRPO/RLOO name theirs the same)
PPO_METRICS = ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "policy_loss", "value_loss",
               "explained_variance", "clipfrac", "value_clipfrac", "approx_kl", "ppo_updates", "reward_sem")


@contextlib.contextmanager
def reference_adapter_hidden(model):
    """The frozen reference adapter taken out of PEFT's config while the model is saved, so the run
    folder holds the trained adapter only (the reference is rebuilt from model.adapter at every start)."""
    adapters = getattr(model, "peft_config", None)
    reference = adapters.pop(REFERENCE_ADAPTER, None) if adapters else None
    try:
        yield
    finally:
        if reference is not None:
            adapters[REFERENCE_ADAPTER] = reference


def rollout_seeds(seed: int, step: int, first: int, rows: int) -> list[int]:
    """The sampling seeds of rollout rows first .. first + rows - 1 of the whole step (every process's
    rows numbered in order); held out: step -1, the same at every evaluation, so the start and the
    end are compared on the same random numbers."""
    return row_seeds(seed, step, rows=first + rows)[first:]


class ValueHead(nn.Module):
    """hidden state -> a scalar value; zero-initialised (every value starts at 0)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def attach_value_head(model) -> ValueHead:
    """A value head as the model's submodule `v_head` (so the optimizer, DDP and checkpoints see it),
    on the device of the model's output layer."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = ValueHead(base.config.get_text_config().hidden_size).to(base.get_output_embeddings().weight.device)
    model.v_head = head
    return head


class VitunePPOTrainer(VituneTrainerMixin, ExactSharesMixin, Trainer):
    """PPO on prompt rows ({"prompt", "question", "conversation", "source"}): see the module docstring."""

    def __init__(self, *args, rl: RlConfig, rewards: list, reward_weights: list[float], eos_ids: list[int],
                 reference: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.rl, self.rewards, self.reward_weights, self.eos_ids = rl, rewards, reward_weights, eos_ids
        self.reference = reference  # "none" (beta 0) | "disable_adapter" | "adapter" | "copy"
        policy = self.model
        self.value_head = policy.v_head
        self.reference_model = None
        if reference == "copy":  # full fine-tuning: the starting weights, frozen
            self.reference_model = copy.deepcopy(policy).eval().requires_grad_(False)
            del self.reference_model.v_head
        self._values, self._want_values = None, False
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        base.get_output_embeddings().register_forward_hook(self._value_of_hidden)
        self._rows: list[dict] = []  # the prompts of this step's micro-batches so far

    def _value_of_hidden(self, module, args, output):
        # the value head reads the last hidden state as the LM head does, inside the model's forward
        # (DDP counts a parameter used outside its wrapped forward as used twice)
        if self._want_values:
            self._values = self.value_head(args[0])

    def floating_point_ops(self, inputs) -> int:
        return 0  # the rows are prompts (strings); tokens and FLOPs are counted by the mixin

    # ------------------------------------------------------------ one step = one PPO iteration

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not inputs.pop(FILLER, False):
            self._rows.extend(inputs["rows"])
        if not self.accelerator.sync_gradients:  # not the step's last micro-batch yet
            return torch.zeros((), device=self.args.device)
        rows, self._rows = self._rows, []
        return self._iteration(model, rows)

    def _total(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor summed over the processes."""
        return self.accelerator.reduce(t, reduction="sum") if self.accelerator.num_processes > 1 else t

    def _iteration(self, model, rows: list[dict]) -> torch.Tensor:
        rl, args = self.rl, self.args
        policy = self.accelerator.unwrap_model(model)
        offset = self.accelerator.process_index * len(rows)
        batch = self._rollout(policy, rows, rollout_seeds(args.seed, self.state.global_step, offset, len(rows)))
        self._count({"input_ids": batch["ids"], "attention_mask": batch["attention"]})
        with torch.no_grad():
            old_logprobs, old_values, entropy = self._forward_in_chunks(model, batch, values=True, entropy=True,
                                                                        train=False)
            ref = self._reference_logprobs(policy, batch) if rl.beta > 0 else old_logprobs
        mask = batch["mask"]
        kl = F.kl_per_token(old_logprobs, ref, rl.kl_estimator) * mask
        rewards = F.token_rewards(batch["scores"], kl, mask, rl.beta)
        advantages, returns = F.gae(rewards, old_values, mask, rl.gamma, rl.lam)
        advantages = F.whiten(advantages, mask, self._total)

        n = len(rows)
        self.record_metric("kl", float(kl.sum()), int(mask.sum()))  # per token, as TRL's GRPO/RLOO log it
        self.record_metric("entropy", float((entropy * mask).sum()), int(mask.sum()))
        self.record_metric("completions/mean_length", float(mask.sum()), n)
        self.record_metric("explained_variance", F.explained_variance(old_values, returns, mask, self._total), 1)
        self._record_scores(batch)

        losses, updates, stop = [], 0, False
        micro = args.per_device_train_batch_size
        for epoch in range(rl.ppo_epochs):
            # each micro-batch shuffled alike on every process (minibatch_rows)
            order = torch.randperm(micro, generator=torch.Generator().manual_seed(
                row_seeds(args.seed, self.state.global_step, epoch, rows=1)[0]))
            for part in range(rl.num_mini_batches):
                picked = minibatch_rows(n, micro, rl.num_mini_batches, part, order)
                loss, moved = self._update(model, batch, picked, old_logprobs, old_values, advantages, returns)
                losses.append(loss)
                updates += 1
                if rl.target_kl is not None and moved > rl.target_kl:
                    stop = True
                    break
            if stop:
                break
        self.record_metric("ppo_updates", updates, 1)
        return torch.tensor(sum(losses) / len(losses), device=args.device)

    def _update(self, model, batch, picked, old_logprobs, old_values, advantages, returns) -> tuple[float, float]:
        """One optimizer update on the rollout rows `picked` -> (its loss, the approximate KL it measured
        between the policy and the rollout's policy, before its own update)."""
        rl, args = self.rl, self.args
        mask = batch["mask"][picked]
        tokens = float(self._total(mask.sum().to(torch.float64)))
        scale = self.accelerator.num_processes / max(tokens, 1.0)  # DDP averages the processes' gradients
        sums = torch.zeros(6, dtype=torch.float64)  # loss, policy loss, value loss, clipped, value clipped, approx kl
        # the updates run on the model itself, and the processes' gradients are averaged here: several
        # forward/backward pairs and optimizer steps per runner step are not what DDP's reducer expects
        model = self.accelerator.unwrap_model(model)
        model.train()
        micro = args.per_device_train_batch_size
        for start in range(0, len(picked), micro):
            rows = picked[start:start + micro]
            part = {k: (v[rows] if torch.is_tensor(v) else v) for k, v in batch.items()}
            m = mask[start:start + micro]
            with self.compute_loss_context_manager():
                logprobs, values, _ = self._forward(model, part, values=True)
            pg, clipped = F.policy_loss(logprobs, old_logprobs[rows], advantages[rows], rl.cliprange)
            vf, vclipped = F.value_loss(values, old_values[rows], returns[rows], rl.cliprange_value)
            loss = ((pg + rl.vf_coef * vf) * m).sum()
            self.accelerator.backward(loss * scale)
            with torch.no_grad():
                parts = [loss, pg * m, vf * m, clipped * m, vclipped * m,
                         F.approx_kl(logprobs, old_logprobs[rows]) * m]
                sums += torch.stack([p.sum().double() for p in parts]).cpu()
        self._average_gradients(model)
        if args.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            self.record_metric("grad_norm", float(norm), 1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # transformers' step after the iteration then finds no gradient
        sums = self._total(sums.to(self.args.device)).cpu() / max(tokens, 1.0)
        for key, value in zip(("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl"), sums[1:]):
            self.record_metric(key, float(value), 1)
        return float(sums[0]), float(sums[5])

    def _average_gradients(self, model) -> None:
        """Every process's gradients replaced by their mean over the processes (one all-reduce)."""
        processes = self.accelerator.num_processes
        if processes == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= processes
        for grad, mean in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(mean)

    # ------------------------------------------------------------ rollout

    def _rollout(self, policy, rows: list[dict], seeds: list[int]) -> dict:
        """Sample and score one completion per row -> the batch: ids (B, L) right-padded prompt +
        completion, attention, `starts` (where each completion begins), completion ids (B, T),
        mask (B, T), scores (B,), and each reward's values."""
        tokenizer = self.processing_class
        prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        completions = sample_completions(policy, prompts, seeds, max_new_tokens=self.rl.max_completion_length,
                                         eos_ids=self.eos_ids, pad_id=pad, temperature=self.rl.temperature)
        batch = pack_rollout(prompts, completions, pad, self.args.device)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        columns = {key: [r[key] for r in rows] for key in ("question", "conversation", "source")}
        per_reward = [torch.tensor(func(prompts=[r["prompt"] for r in rows], completions=texts, **columns),
                                   dtype=torch.float32) for func in self.rewards]
        batch["per_reward"] = per_reward
        batch["scores"] = sum(w * r for w, r in zip(self.reward_weights, per_reward)).to(self.args.device)
        batch["texts"] = texts
        return batch

    def _record_scores(self, batch: dict) -> None:
        scores = batch["scores"].double()
        n = scores.numel()
        totals = self._total(torch.stack([scores.sum(), (scores * scores).sum(), torch.tensor(float(n))]))
        mean = totals[0] / totals[2]
        std = math.sqrt(max(float(totals[1] / totals[2] - mean * mean), 0.0) * float(totals[2]) / max(float(totals[2]) - 1, 1))
        self.record_metric("reward", float(scores.sum()), n)
        self.record_metric("reward_std", std, 1)
        for func, values in zip(self.rewards, batch["per_reward"]):
            self.record_metric(f"rewards/{func.__name__}/mean", float(values.sum()), n)

    # ------------------------------------------------------------ forwards

    def _forward(self, model, batch: dict, values: bool = False, entropy: bool = False):
        """log-probabilities of the completion tokens under the (tempered) policy, and the values
        and entropies at the same positions; each (B, T)."""
        self._want_values = values
        try:
            out = model(input_ids=batch["ids"], attention_mask=batch["attention"], use_cache=False)
        finally:
            self._want_values = False
        positions = batch["starts"][:, None] - 1 + torch.arange(batch["completion"].shape[1], device=batch["ids"].device)
        positions = positions.clamp(max=batch["ids"].shape[1] - 1)
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        logits = out.logits[rows, positions].float() / self.rl.temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, batch["completion"][..., None]).squeeze(-1)
        value = self._values[rows, positions] if values else None
        ent = F.entropy(logits) if entropy else None
        self._values = None
        return logprobs, value, ent

    def _forward_in_chunks(self, model, batch: dict, values=False, entropy=False, train=True):
        """`_forward` a micro-batch at a time (no gradient), concatenated."""
        model.train(train)
        micro = self.args.per_device_train_batch_size
        outs = []
        n = batch["ids"].shape[0]
        for start in range(0, n, micro):
            part = {k: (v[start:start + micro] if torch.is_tensor(v) else v) for k, v in batch.items()}
            with self.compute_loss_context_manager():
                outs.append(self._forward(model, part, values, entropy))
        model.train()
        return tuple(torch.cat([o[i] for o in outs]) if outs[0][i] is not None else None for i in range(3))

    def _reference_logprobs(self, policy, batch: dict) -> torch.Tensor:
        if self.reference == "disable_adapter":
            with policy.disable_adapter():
                return self._forward_in_chunks(policy, batch, train=False)[0]
        if self.reference == "adapter":  # the frozen copy of model.adapter, by PEFT's per-row adapter names
            names = [REFERENCE_ADAPTER] * batch["ids"].shape[0]
            return self._forward_in_chunks(_WithAdapterNames(policy, names), batch, train=False)[0]
        return self._forward_in_chunks(self.reference_model, batch, train=False)[0]

    # ------------------------------------------------------------ held-out prompts

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """The held-out prompts' mean reward (with its standard error), KL to the reference (per token),
        completion length, and as eval_loss the value head's error on their returns (0.5 x squared, as
        the value loss); each prompt sampled from the same seed at every evaluation."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        rows_all = [dataset[i] for i in range(len(dataset))]
        rows = split_batch(rows_all, self.accelerator.num_processes)[self.accelerator.process_index]
        offset = sum(len(s) for s in split_batch(rows_all, self.accelerator.num_processes)[:self.accelerator.process_index])
        policy = self.accelerator.unwrap_model(self.model)
        sums = torch.zeros(6, dtype=torch.float64)  # n, reward, reward^2, kl, tokens, value error
        if rows:
            batch = self._rollout(policy, rows, rollout_seeds(self.args.seed, -1, offset, len(rows)))
            with torch.no_grad():
                logprobs, values, _ = self._forward_in_chunks(self.model, batch, values=True, train=False)
                ref = self._reference_logprobs(policy, batch) if self.rl.beta > 0 else logprobs
            mask = batch["mask"]
            kl = F.kl_per_token(logprobs, ref, self.rl.kl_estimator) * mask
            _, returns = F.gae(F.token_rewards(batch["scores"], kl, mask, self.rl.beta), values, mask, self.rl.gamma,
                               self.rl.lam)
            scores = batch["scores"].double().cpu()
            sums += torch.tensor([len(rows), float(scores.sum()), float((scores * scores).sum()), float(kl.sum()),
                                  float(mask.sum()), float((0.5 * (values - returns) ** 2 * mask).sum())],
                                 dtype=torch.float64)
        total = self._total(sums.to(self.args.device)).cpu()
        n = float(total[0])
        mean = float(total[1]) / n
        var = max(float(total[2]) / n - mean * mean, 0.0) * n / max(n - 1, 1)
        metrics = {
            f"{metric_key_prefix}_loss": round(float(total[5] / total[4]), 6),
            f"{metric_key_prefix}_reward": round(mean, 6),
            f"{metric_key_prefix}_reward_sem": round(math.sqrt(var / n), 6),
            f"{metric_key_prefix}_kl": round(float(total[3] / total[4]), 6),
            f"{metric_key_prefix}_completions/mean_length": round(float(total[4]) / n, 6),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ------------------------------------------------------------ saving

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        policy = self.accelerator.unwrap_model(self.model)
        head = policy._modules.pop("v_head")
        try:
            if state_dict is not None:
                state_dict = {k: v for k, v in state_dict.items() if not k.startswith("v_head.")}
            with reference_adapter_hidden(policy):
                super()._save(output_dir, state_dict)
        finally:
            policy._modules["v_head"] = head
        if self.args.should_save:
            save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                      str(Path(output_dir) / VALUE_HEAD))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / VALUE_HEAD
        self.value_head.load_state_dict({k: v.to(self.value_head.linear.weight.device)
                                         for k, v in load_file(str(path)).items()})


class _WithAdapterNames(nn.Module):
    """The policy called with PEFT's per-row `adapter_names` (inference only)."""

    def __init__(self, policy, names: list[str]):
        super().__init__()
        self.policy, self.names = policy, names

    def forward(self, input_ids, attention_mask, **kwargs):
        return self.policy(input_ids=input_ids, attention_mask=attention_mask,
                           adapter_names=self.names[:input_ids.shape[0]], **kwargs)


def minibatch_rows(n: int, micro: int, parts: int, part: int, order: torch.Tensor) -> torch.Tensor:
    """The rollout rows of one update: rows are in micro-batches of `micro`; each micro-batch is
    shuffled by `order` (the same on every process) and cut into `parts` pieces, and the update takes
    piece `part` of every micro-batch. So N processes' updates hold the rows one process's would."""
    size = micro // parts
    picked = [block + int(i) for block in range(0, n, micro)
              for i in order[part * size:(part + 1) * size] if block + int(i) < n]
    return torch.tensor(picked, dtype=torch.long)


def pack_rollout(prompts: list[list[int]], completions: list[list[int]], pad: int, device) -> dict:
    """Prompt + completion rows, right-padded -> ids, attention (B, L); starts (B,); the completions
    right-padded, completion (B, T), and their mask (B, T)."""
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    longest = max(max(len(c) for c in completions), 1)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), longest))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        attention[i, :len(p) + len(c)] = 1
        completion[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, :len(c)] = 1
    starts = torch.tensor([len(p) for p in prompts])
    return {"ids": ids.to(device), "attention": attention.to(device), "starts": starts.to(device),
            "completion": completion.to(device), "mask": mask.to(device)}
