"""Stage rl: reinforcement learning from rewards -- GRPO or RLOO through TRL, or classic PPO with a
value head (vitune.train.ppo) -- on the shared runner.

Its own parts:
- data: prompts from any SFT data (alpaca, sharegpt, messages); the answer a row ends with is
  dropped. Each prompt is rendered by the run's chat template up to the assistant's generation
  prompt -- exactly what `vitune chat` sends the model -- and handed to TRL as a finished string,
  tokenised without special tokens (the template writes its own BOS; TRL's tokenizer call would
  add a second one). Prompts over data.max_length tokens are rejected and counted.
- generation: TRL samples `rl.num_generations` completions per prompt, at most
  `rl.max_completion_length` tokens, stopping at the template's end of turn (the model's
  generation config gets the template's stop ids);
- rewards (vitune.train.reward_functions): Python functions and vitune reward models, summed with their
  weights; each sees the completion without its end-of-turn marker;
- the reference for the KL term (`rl.beta` > 0): the model with the adapter disabled (a new
  LoRA/QLoRA adapter: the base), TRL's frozen copy of the starting adapter for `model.adapter`
  (an SFT run: the reference is that SFT model), or TRL's second copy of the model (full);
- the loss and the padded batches are TRL's (GRPOTrainer / RLOOTrainer), with vitune's telemetry,
  atomic checkpoints and exact resume (VituneTrainerMixin); metrics: reward, reward_std, kl,
  completion length, entropy, and each reward's mean, in metrics.jsonl and the progress bar.

Batch sizes count completions: one optimizer step takes micro_batch_size x gradient_accumulation
x processes completions, i.e. that number / num_generations prompts, so it must be a multiple of
num_generations.

`rl.algorithm: ppo` takes the same prompts, rewards and batch sizes to vitune.train.ppo's trainer
(a value head, GAE, the clipped losses); the prompts of a step are its rollout, each repeated
rl.num_generations times.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainingArguments
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from vitune.config import RunConfig
from vitune.data.pipeline import DataReport, load_conversations, raise_for_bad_rows
from vitune.data.records import Conversation, Rejection
from vitune.data.templates import TemplateRefused, stop_token_ids
from vitune.errors import ConfigError, DataError
from vitune.train.arguments import training_arguments
from vitune.train.ppo import PPO_METRICS, REFERENCE_ADAPTER, VitunePPOTrainer, attach_value_head, reference_adapter_hidden
from vitune.train.reward_functions import check_rewards, conversation_json, load_rewards
from vitune.train.rollouts import row_seeds, sample_completions
from vitune.train.sharding import process_state
from vitune.train.stage import Batches, Stage
from vitune.train.trainer import VituneTrainerMixin

TRL_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "completions/mean_length",
               "completions/clipped_ratio")


@dataclass
class PromptRow:
    prompt: str  # rendered by the chat template, ending with the generation prompt
    question: str  # the last user message: what reward functions get as `prompt`
    conversation: str  # the turns before the answer (JSON), for reward models
    source: str  # file and row, for error messages
    tokens: int


# ---------------------------------------------------------------- data


def prepare_prompts(config: RunConfig, tokenizer, template):
    """SFT rows -> (train prompts, eval prompts, report), read = kept + rejected."""
    data = config.data
    report = DataReport()
    train_convs, eval_convs = load_conversations(data, config.train.seed, report)
    splits = []
    for convs, count in ((train_convs, True), (eval_convs, False)):
        rows = []
        for conv in convs:
            asked = conv.messages[:-1] if conv.messages and conv.messages[-1].role == "assistant" else conv.messages
            context = Conversation(asked, system=conv.system, source=conv.source)
            try:
                prompt = template.prompt(context)
            except TemplateRefused as exc:
                report.rejections.append(Rejection(conv.source, exc.reason, exc.detail))
                continue
            n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if n > data.max_length:
                report.rejections.append(Rejection(conv.source, "too long", f"prompt of {n} tokens > data.max_length "
                                                   f"{data.max_length} (raise data.max_length)"))
                continue
            rows.append(PromptRow(prompt, asked[-1].text, conversation_json(context), conv.source, n))
            if count:
                report.total_tokens += n  # prompt tokens: none of them is trained (completions are)
        splits.append(rows)
    raise_for_bad_rows(report, data.on_error)
    if not splits[0]:
        raise DataError(f"every training prompt was rejected ({report.rejected_by_reason}); see the reasons above")
    report.rows_kept = report.rows_read - report.rows_rejected
    return splits[0], splits[1], report


def check_group_size(config: RunConfig, processes: int) -> None:
    """TRL groups each prompt's completions within one generation batch (TRL #3061): the completions
    of a step must be a whole number of groups."""
    t, g = config.train, config.rl.num_generations
    per_step = t.micro_batch_size * t.gradient_accumulation * processes
    if per_step % g == 0:
        return
    micro = next(m for m in range(t.micro_batch_size, t.micro_batch_size + g + 1)
                 if (m * t.gradient_accumulation * processes) % g == 0)
    smaller = max((n for n in range(2, g) if per_step % n == 0), default=None)
    other = f" (or rl.num_generations to {smaller})" if smaller else ""
    raise ConfigError(
        f"train.micro_batch_size {t.micro_batch_size} x train.gradient_accumulation {t.gradient_accumulation} x "
        f"{processes} process(es) = {per_step} completions per step, not a multiple of rl.num_generations {g} (each "
        f"prompt's {g} completions are compared within one step); set train.micro_batch_size to {micro}{other}"
    )


# ---------------------------------------------------------------- trainers


class RlTrainerMixin(VituneTrainerMixin):
    """What vitune changes in TRL's RL trainers: prompts tokenised as rendered, telemetry over the
    prompt + completion rows, and only the trained adapter saved (TRL's frozen reference copy is
    rebuilt from model.adapter at every start)."""

    def _tokenize_prompts(self, prompts: list):
        # vitune's template already wrote the BOS (if the model has one): add no special tokens
        return self.processing_class(text=prompts, add_special_tokens=False)["input_ids"], None, {}

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
        """Rollouts through vitune.train.rollouts.sample_completions instead of TRL's left-padded
        `generate` (2.9x its tokens/s on a 2-core CPU: that module's docstring has the figures) -> what TRL's
        regular path returns: GRPO (completion ids, None), RLOO the ids; each ends at its first eos,
        included. Row i is seeded from (train seed, step -- held out: -1 --, process, train/eval, call
        of the step, i), so a resumed run draws the same completions and every evaluation the same ones. TRL's own path where it samples otherwise: vLLM,
        continuous batching, images, min_p, a repetition penalty or extra generation_kwargs."""
        config = self.generation_config
        if (self.use_vllm or self.use_transformers_continuous_batching or images is not None or multimodal_fields
                or config.min_p is not None or config.repetition_penalty not in (None, 1.0) or self.args.generation_kwargs):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        # evaluation rolls out several batches at one step: each call of a step gets its own seeds (the
        # same seeds for other prompts would draw the same tokens from a near-uniform model)
        step = (self.state.global_step, model.training)
        self._rollout_calls = self._rollout_calls + 1 if getattr(self, "_rollout_step", None) == step else 0
        self._rollout_step = step
        # held out: the same seeds at every evaluation (step -1), so the start and the end are compared
        # on the same random numbers, as PPO's are
        seeds = row_seeds(self.args.seed, self.state.global_step if model.training else -1,
                          self.accelerator.process_index, int(model.training), self._rollout_calls,
                          rows=len(prompt_ids))
        completions = sample_completions(
            model, prompt_ids, seeds, max_new_tokens=config.max_new_tokens, eos_ids=list(self.eos_token_ids),
            pad_id=self._tokenizer.pad_token_id, temperature=config.temperature, top_p=config.top_p,
            top_k=config.top_k or 0)
        # GRPOTrainer's path also returns the sampler's log-probs (vLLM's; none here), RLOOTrainer's does not
        return (completions, None) if isinstance(self, GRPOTrainer) else completions

    def _row_lengths(self, inputs: dict) -> tuple[torch.Tensor, int]:
        lengths = inputs["prompt_mask"].sum(dim=1) + inputs["completion_mask"].sum(dim=1)
        return lengths, inputs["prompt_ids"].numel() + inputs["completion_ids"].numel()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        with reference_adapter_hidden(self.accelerator.unwrap_model(self.model)):
            super()._save(output_dir, state_dict)


class VituneGRPOTrainer(RlTrainerMixin, GRPOTrainer):
    """TRL's GRPO (group-relative advantages) with vitune's telemetry and checkpoints."""


class VituneRLOOTrainer(RlTrainerMixin, RLOOTrainer):
    """TRL's RLOO (leave-one-out baseline) with vitune's telemetry and checkpoints."""


ALGORITHMS = {"grpo": (GRPOConfig, VituneGRPOTrainer), "rloo": (RLOOConfig, VituneRLOOTrainer),
              "ppo": (TrainingArguments, VitunePPOTrainer)}


def collate_prompts(rows: list[dict]) -> dict:
    """PPO's micro-batch: the prompt rows as they are (the trainer samples and tokenises)."""
    return {"rows": rows}


def check_ppo(config: RunConfig, processes: int) -> None:
    """What rl.algorithm: ppo needs of the run's other settings."""
    rl, t = config.rl, config.train
    if t.deepspeed or t.fsdp:
        raise ConfigError(f"rl.algorithm: ppo steps the optimizer several times per step, which DeepSpeed's engine and "
                          f"FSDP are not set up for here; remove train.{'deepspeed' if t.deepspeed else 'fsdp'} "
                          "(PPO scales out over plain processes: vitune train --nproc N)")
    if t.micro_batch_size % rl.num_mini_batches:
        raise ConfigError(f"rl.num_mini_batches {rl.num_mini_batches} must divide train.micro_batch_size "
                          f"{t.micro_batch_size} (each update takes that share of every micro-batch); set "
                          f"train.micro_batch_size to {rl.num_mini_batches * max(1, t.micro_batch_size // rl.num_mini_batches)}")


# ---------------------------------------------------------------- stage


class RlStage(Stage):
    name = "rl"
    metric_keys = TRL_METRICS
    progress_fields = (("reward", "reward"), ("kl", "kl"), ("len", "completions/mean_length"))
    summary_keys = ("reward", "kl", "completions/mean_length")
    packed_forward = False  # TRL pads its prompt + completion rows itself
    held_out_loss = False  # held-out prompts are judged by their completions' mean reward (eval_reward)

    def check(self, config: RunConfig) -> None:
        super().check(config)
        check_rewards(config.rl.rewards)
        processes = process_state().num_processes
        if config.rl.algorithm == "ppo":
            check_ppo(config, processes)
            return
        check_group_size(config, processes)
        if (config.data.eval or config.data.val_size) and (config.train.micro_batch_size * processes) % config.rl.num_generations:
            raise ConfigError(
                f"held-out prompts (data.eval / data.val_size) are evaluated {config.train.micro_batch_size * processes} "
                f"completions at a time (train.micro_batch_size x processes), not a multiple of rl.num_generations "
                f"{config.rl.num_generations}; raise train.micro_batch_size or remove data.eval / data.val_size")

    def metrics_of(self, config: RunConfig) -> tuple[str, ...]:
        # TRL logs each reward's mean as rewards/<name>/mean (names as reward_functions.py gives them)
        names = [r.function.partition(":")[2] if r.function else Path(r.model).name for r in config.rl.rewards]
        own = PPO_METRICS if config.rl.algorithm == "ppo" else TRL_METRICS
        return own + tuple(f"rewards/{n}/mean" for n in names)

    def prepare_data(self, config: RunConfig, tokenizer, template, data_key=None, resume_from=None):
        return prepare_prompts(config, tokenizer, template)

    def describe_rows(self, report, train_rows, eval_rows) -> str:
        held = f" + {len(eval_rows):,} held out" if eval_rows else ""
        return f"{len(train_rows):,} prompts{held} (their answers unused), "

    def batches(self, config: RunConfig, plan, train_rows, eval_rows, pad_token_id: int, console) -> Batches:
        def dataset(rows, repeat=1):
            return Dataset.from_list([{"prompt": r.prompt, "question": r.question, "conversation": r.conversation,
                                       "source": r.source} for r in rows for _ in range(repeat)]) if rows else []

        if config.rl.algorithm == "ppo":  # each prompt's completions are rows of their own
            return Batches(dataset(train_rows, config.rl.num_generations), dataset(eval_rows), collator=collate_prompts)
        return Batches(dataset(train_rows), dataset(eval_rows), collator=None)

    def training_arguments(self, config: RunConfig, run, output_dir: Path, plan, has_eval: bool):
        rl = config.rl
        args_class, _ = ALGORITHMS[rl.algorithm]
        if rl.algorithm == "ppo":
            # a step's prompts are its rollout: a short last batch of an epoch is left out, as TRL's GRPO does
            return training_arguments(config, output_dir, has_eval, plan, run.scale_out, run.optimizer,
                                      resuming=run.resume_from is not None, dataloader_drop_last=True)
        grpo = {"loss_type": rl.loss_type} if rl.loss_type else {}
        if rl.algorithm == "grpo":
            grpo["importance_sampling_level"] = rl.importance_sampling_level
        return training_arguments(
            config, output_dir, has_eval, plan, run.scale_out, run.optimizer, resuming=run.resume_from is not None,
            args_class=args_class,
            num_generations=rl.num_generations,
            max_completion_length=rl.max_completion_length,
            beta=rl.beta,
            temperature=rl.temperature,
            reward_weights=[r.weight for r in rl.rewards],
            log_completions=False,
            **grpo,
        )

    def make_trainer(self, config: RunConfig, run, **kwargs):
        template = run.template
        _, trainer_class = ALGORITHMS[config.rl.algorithm]
        model, tokenizer = kwargs["model"], kwargs["processing_class"]
        rewards = load_rewards(config.rl.rewards, template.stop_strings)
        if config.rl.algorithm == "ppo":
            return self._ppo_trainer(config, model, tokenizer, template, rewards, kwargs)
        kwargs.pop("data_collator", None)  # TRL batches the prompts itself
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # completions end where an answer ends: TRL stops on every eos id of the generation config
        base.generation_config.eos_token_id = stop_token_ids(tokenizer, template)
        trainer = trainer_class(reward_funcs=rewards, **kwargs)
        if config.model.adapter is None and REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            # TRL copied the new adapter as the reference; a new adapter starts as the base, which the
            # adapter disabled gives without a second adapter in every reference forward
            model.delete_adapter(REFERENCE_ADAPTER)
        return trainer

    @staticmethod
    def _ppo_trainer(config: RunConfig, model, tokenizer, template, rewards, kwargs):
        if config.rl.beta == 0:
            reference = "none"
        elif config.method.type == "full":
            reference = "copy"
        elif config.model.adapter:  # the SFT adapter the run continues, frozen
            model.load_adapter(config.model.adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            reference = "adapter"
        else:
            reference = "disable_adapter"
        attach_value_head(model)
        return VitunePPOTrainer(rl=config.rl, rewards=rewards, reward_weights=[r.weight for r in config.rl.rewards],
                                eos_ids=stop_token_ids(tokenizer, template), reference=reference, **kwargs)

    def held_out_lines(self, summary: dict) -> list[str]:
        lines = []
        if summary.get("eval_reward_end") is not None:
            start = f"{summary['eval_reward_start']:.4f} (start) -> " if summary.get("eval_reward_start") is not None else ""
            sem = (f" (standard error {summary['eval_reward_sem_end']:.4f})"
                   if summary.get("eval_reward_sem_end") is not None else "")
            lines.append(f"held-out prompts: mean reward {start}{summary['eval_reward_end']:.4f} (end){sem}")
        if summary.get("reward_last") is not None:
            lines.append(f"mean reward {summary['reward_first']:.4f} (first step) -> {summary['reward_last']:.4f} (last step)")
        return lines
