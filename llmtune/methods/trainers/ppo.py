"""RLHF with PPO, written here on Accelerate (TRL removed its PPOTrainer in 1.13).

One PPO step:

1. rollout: sample a response to each of `train.batch_size` prompts from the current policy (per
   process: with N processes each rank draws its own share of a global batch of N x batch_size);
2. score: reward model and/or Python reward function, minus the missing-EOS / overlong penalties;
3. old log-probabilities and values (policy), reference log-probabilities (frozen reference);
4. per-token rewards = -kl_coef * (log pi - log pi_ref), plus the score on the last token; GAE;
   advantages whitened;
5. `ppo_epochs` passes over shuffled mini-batches of the rollout: clipped policy loss + vf_coef *
   clipped value loss, one optimizer step per mini-batch;
6. the KL controller sees the measured KL; one row of metrics.jsonl.

Several processes (accelerate launch): the policy is wrapped in DDP, so the gradients of every
mini-batch are averaged over ranks; advantages are whitened with the global batch's mean and
variance (TRL's former PPO whitened per rank, so its step depended on the process count); the
metrics and the KL fed to the controller are over the global batch, so every rank's adaptive
coefficient stays the same. Held-out prompts are shared out between ranks and the scores gathered.

Choices (and why):
- Value: a scalar linear head on the policy's last hidden state (a shared trunk, as in TRL's
  former AutoModelForCausalLMWithValueHead), not a separate value model. It costs one vector of
  weights instead of a second network in memory and a second forward pass per step; the price is
  that value gradients also reach the shared weights, weighted by `ppo.vf_coef`. The head starts
  at zero (no initial bias in advantages) and is saved as final/value_head.safetensors beside the
  policy, so final/ itself stays a plain causal LM or PEFT adapter.
- Reference: under a PEFT adapter the reference is the same model with its adapters disabled
  (`disable_adapter()`): no second copy in memory, and it is bit-identical to the base because the
  base weights are frozen. With whole weights training, a frozen deep copy of the initial policy.
- Dropout is off (model.eval() throughout): the log-probabilities of the rollout and of the
  update must come from the same function, or the ratio is noise at step one.
- Log-probabilities are taken from logits / temperature: that is the distribution sampled from.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmtune.distributed import is_main_process
from llmtune.errors import UserError
from llmtune.launch import SHARDING_ENGINES, whole_weights_error
from llmtune.methods.trainers.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_of,
    explained_variance,
    gae,
    logprobs_of,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    score_with_penalties,
    value_loss,
)
from llmtune.models.load import Precision, training_device
from llmtune.recipe import Recipe
from llmtune.runs import RunDir


@dataclass
class PPOOutput:
    global_step: int


class PolicyWithValueHead(torch.nn.Module):
    """The policy plus a scalar value head on its last hidden state (see the module docstring)."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        hidden = policy.get_input_embeddings().weight.shape[1]
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, n_response: int, temperature: float):
        """Logits (temperature applied) and values at the positions that predict the last `n_response` tokens."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as generate() used them
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            logits_to_keep=n_response + 1,
            use_cache=False,
        )
        logits = out.logits[:, :-1] / temperature
        hidden = out.hidden_states[-1][:, -n_response - 1 : -1]
        return logits, self.value_head(hidden.float()).squeeze(-1)


class RewardScorer:
    """Sequence-level scores: reward model and/or a reward function, summed.

    The reward model reads prompt + response through its own tokenizer's chat template, as TRL's
    RewardTrainer trained it. The reward function follows TRL's GRPO convention, so one function
    serves both methods: fn(prompts=[messages...], completions=[[{"role": "assistant", "content": ...}]])
    -> list of floats.
    """

    def __init__(self, reward_model: str | None, reward_function: str | None, device: torch.device):
        self.model = self.tokenizer = self.function = None
        if reward_model:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            if not Path(reward_model).is_dir():
                raise UserError(
                    f"method.ppo.reward_model: {reward_model} is not a directory; give the final/ folder "
                    "of a reward run (or a stage name through from_stage)"
                )
            self.tokenizer = AutoTokenizer.from_pretrained(reward_model)
            self.model = AutoModelForSequenceClassification.from_pretrained(reward_model, dtype=torch.float32).to(device).eval()
            if self.model.config.num_labels != 1:
                raise UserError(
                    f"method.ppo.reward_model: {reward_model} has {self.model.config.num_labels} labels; a reward model has 1"
                )
            self.model.requires_grad_(False)
        if reward_function:
            self.function = load_function(reward_function, "method.ppo.reward_function")

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], completions: list[str]) -> torch.Tensor:
        scores = torch.zeros(len(prompts))
        if self.model is not None:
            texts = [
                self.tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
                for p, c in zip(prompts, completions)
            ]
            self.tokenizer.padding_side = "right"
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
            scores += self.model(**batch).logits[:, 0].float().cpu()
        if self.function is not None:
            values = self.function(prompts=prompts, completions=[[{"role": "assistant", "content": c}] for c in completions])
            scores += torch.tensor([float(v) for v in values])
        return scores


def load_function(path: str, key: str):
    """`package.module:function` or `package.module.function` -> the function."""
    module_name, _, name = path.rpartition(":") if ":" in path else path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(
            f"{key}: cannot import {path!r} ({exc}); give `package.module:function` importable from the working directory"
        ) from None
    if not callable(function):
        raise UserError(f"{key}: {path!r} is not a function")
    return function


class PPOTrainer:
    def __init__(self, recipe: Recipe, run: RunDir, model, tokenizer, prompts: list, precision: Precision):
        from accelerate import Accelerator

        self.recipe, self.run, self.cfg, self.tokenizer = recipe, run, recipe.method.ppo, tokenizer
        # 16-bit autocast as the other methods run it (weights that train in full stay fp32, see for_trainable_weights).
        self.accelerator = Accelerator(
            cpu=training_device().type == "cpu", mixed_precision="bf16" if precision.bf16 else "fp16" if precision.fp16 else "no"
        )
        if self.accelerator.distributed_type.value in SHARDING_ENGINES:  # under the user's own launcher
            raise UserError(whole_weights_error("ppo"))
        self.peft = hasattr(model, "disable_adapter")
        # Whole weights train: the reference is a frozen copy made before the first update.
        self.reference = None if self.peft else copy.deepcopy(model).requires_grad_(False).eval()
        self.model = model
        self.scorer = RewardScorer(self.cfg.reward_model, self.cfg.reward_function, self.accelerator.device)
        self.prompts = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts
        ]
        self.prompt_messages = list(prompts)
        t = recipe.train
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.global_batch = t.batch_size * self.world
        if len(prompts) < self.global_batch:
            raise UserError(
                f"data.sources: {len(prompts)} prompts, fewer than one PPO batch ({t.batch_size} x "
                f"{self.world} process(es)); add prompts or lower train.batch_size"
            )
        self.max_steps = t.max_steps or math.ceil(t.epochs * len(prompts) / self.global_batch)
        self.wrapped = PolicyWithValueHead(model).to(self.accelerator.device)
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        from transformers import get_scheduler

        updates = self.max_steps * self.cfg.ppo_epochs * math.ceil(t.batch_size / self.cfg.mini_batch_size)
        warmup = int(t.warmup * updates) if t.warmup < 1 else int(t.warmup)
        self.scheduler = get_scheduler(t.lr_scheduler, self.optimizer, num_warmup_steps=warmup, num_training_steps=updates)
        self.wrapped, self.optimizer, self.scheduler = self.accelerator.prepare(self.wrapped, self.optimizer, self.scheduler)
        self.kl_ctl = (
            AdaptiveKLController(self.cfg.kl_coef, self.cfg.kl_target, self.cfg.kl_horizon)
            if self.cfg.kl_target
            else FixedKLController(self.cfg.kl_coef)
        )
        self.generator = torch.Generator().manual_seed(t.seed)
        self.step = 0

    # -- rollout -----------------------------------------------------------------------------------

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
        return ids.to(self.accelerator.device), mask.to(self.accelerator.device)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], greedy: bool = False):
        """Sample responses; returns (prompt ids, prompt mask, response ids, response mask, has_eos)."""
        policy = self.accelerator.unwrap_model(self.wrapped).policy
        ids, mask = self._left_pad(prompt_ids)
        # top_k=0 / top_p=1: sample from the policy's own distribution, whose log-probabilities PPO uses.
        out = policy.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=self.cfg.max_new_tokens,
            do_sample=not greedy,
            temperature=self.cfg.temperature if not greedy else None,
            top_k=0 if not greedy else None,
            top_p=1.0 if not greedy else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        response = out[:, ids.shape[1] :]
        is_eos = response == self.tokenizer.eos_token_id
        has_eos = is_eos.any(1)
        # Response tokens run up to and including the first EOS; the rest is padding.
        first_eos = torch.where(has_eos, is_eos.float().argmax(1), torch.full_like(has_eos, response.shape[1], dtype=torch.long))
        positions = torch.arange(response.shape[1], device=response.device)
        response_mask = (positions[None] <= first_eos[:, None]).long()
        response = torch.where(response_mask.bool(), response, self.tokenizer.pad_token_id)
        return ids, mask, response, response_mask, has_eos

    def completions_of(self, response, response_mask) -> list[str]:
        return [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(response, response_mask)]

    def _forward(self, prompt_ids, prompt_mask, response, response_mask, reference: bool = False):
        with self.accelerator.autocast():
            return self._forward_pass(prompt_ids, prompt_mask, response, response_mask, reference)

    def _forward_pass(self, prompt_ids, prompt_mask, response, response_mask, reference: bool):
        input_ids = torch.cat([prompt_ids, response], 1)
        attention_mask = torch.cat([prompt_mask, response_mask], 1)
        # Forwards without gradients bypass DDP: nothing to synchronise, and rank 0 may run them alone.
        module = self.wrapped if torch.is_grad_enabled() else self.accelerator.unwrap_model(self.wrapped)
        if not reference:
            return module(input_ids, attention_mask, response.shape[1], self.cfg.temperature)
        if self.peft:
            with self.accelerator.unwrap_model(self.wrapped).policy.disable_adapter():
                logits, _ = module(input_ids, attention_mask, response.shape[1], self.cfg.temperature)
            return logits, None
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.reference(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=response.shape[1] + 1,
            use_cache=False,
        ).logits[:, :-1]
        return logits / self.cfg.temperature, None

    # -- training ----------------------------------------------------------------------------------

    def ppo_step(self, batch_indices: list[int]) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.wrapped.eval()
        prompts = [self.prompt_messages[i] for i in batch_indices]
        prompt_ids, prompt_mask, response, mask, has_eos = self.generate([self.prompts[i] for i in batch_indices])
        completions = self.completions_of(response, mask)
        raw_scores = self.scorer(prompts, completions).to(response.device)
        lengths = mask.sum(1)
        scores = score_with_penalties(
            raw_scores, has_eos, lengths, cfg.missing_eos_penalty, cfg.overlong_after, cfg.overlong_penalty
        )
        fmask = mask.float()
        with torch.no_grad():
            old_logprobs, old_values, ref_logprobs = [], [], []
            for s in range(0, len(batch_indices), cfg.mini_batch_size):
                part = slice(s, s + cfg.mini_batch_size)
                logits, values = self._forward(prompt_ids[part], prompt_mask[part], response[part], mask[part])
                old_logprobs.append(logprobs_of(logits, response[part]))
                old_values.append(values)
                ref_logits, _ = self._forward(prompt_ids[part], prompt_mask[part], response[part], mask[part], reference=True)
                ref_logprobs.append(logprobs_of(ref_logits, response[part]))
            old_logprobs, old_values, ref_logprobs = torch.cat(old_logprobs), torch.cat(old_values), torch.cat(ref_logprobs)
            kl_coef = self.kl_ctl.value
            rewards, kl = per_token_rewards(scores, old_logprobs, ref_logprobs, fmask, kl_coef)
            # Whitened with the global batch's mean and variance: N ranks take the same step as one
            # process holding the whole batch would.
            over_ranks = (lambda t: self.accelerator.reduce(t, "sum")) if self.world > 1 else None
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, fmask, shift_mean=False, sum_over_ranks=over_ranks)
            advantages, returns = gae(rewards, old_values, fmask, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, fmask, sum_over_ranks=over_ranks)

        self.wrapped.train(False)  # dropout stays off (see the module docstring); gradients still flow
        stats: dict[str, list[float]] = {
            k: [] for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "value_clipfrac", "entropy")
        }
        n = len(batch_indices)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=self.generator)
            for s in range(0, n, cfg.mini_batch_size):
                idx = order[s : s + cfg.mini_batch_size].to(response.device)
                logits, values = self._forward(prompt_ids[idx], prompt_mask[idx], response[idx], mask[idx])
                logprobs = logprobs_of(logits, response[idx])
                pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[idx], advantages[idx], fmask[idx], cfg.clip_range)
                vf_loss, vf_stats = value_loss(values, old_values[idx], returns[idx], fmask[idx], cfg.clip_range_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                self.accelerator.backward(loss)
                self.accelerator.clip_grad_norm_(self.wrapped.parameters(), self.recipe.train.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
                with torch.no_grad():
                    stats["policy_loss"].append(pg_loss.item())
                    stats["value_loss"].append(vf_loss.item())
                    stats["entropy"].append(masked_mean(entropy_of(logits), fmask[idx]).item())
                    for k, v in (pg_stats | vf_stats).items():
                        stats[k].append(v.item())

        # Metrics and the KL controller's input over the global batch (identical on every rank).
        gather = self.accelerator.gather
        kl_per_response = gather(kl.sum(1))
        scores, raw_scores, lengths, has_eos = gather(scores), gather(raw_scores), gather(lengths), gather(has_eos.float())
        # Responses are as long as each rank's longest: pad them to one width (mask 0) before gathering.
        explained = explained_variance(
            *(gather(self.accelerator.pad_across_processes(t, dim=1)) for t in (old_values, returns, fmask))
        )
        self.kl_ctl.update(kl_per_response.mean().item(), len(scores))
        elapsed = time.perf_counter() - t0
        local = torch.tensor([sum(v) / len(v) for v in stats.values()], device=response.device)
        mean = dict(zip(stats, self.accelerator.reduce(local, "mean").tolist()))
        n = len(scores)
        return {
            "responses": n,
            "loss": round(mean["policy_loss"] + cfg.vf_coef * mean["value_loss"], 6),
            "lr": self.scheduler.get_last_lr()[0],
            "reward_mean": round(scores.mean().item(), 5),
            "reward_std": round(scores.std().item(), 5) if n > 1 else 0.0,
            "score_mean": round(raw_scores.mean().item(), 5),  # before the EOS/length penalties
            "kl": round(kl_per_response.mean().item(), 5),
            "kl_coef": round(kl_coef, 6),
            "entropy": round(mean["entropy"], 5),
            "clipfrac": round(mean["clipfrac"], 5),
            "approx_kl": round(mean["approx_kl"], 6),
            "policy_loss": round(mean["policy_loss"], 6),
            "value_loss": round(mean["value_loss"], 6),
            "value_clipfrac": round(mean["value_clipfrac"], 5),
            "explained_variance": round(explained.item(), 5),
            "response_length": round(lengths.float().mean().item(), 2),
            "eos_fraction": round(has_eos.float().mean().item(), 3),
            "tokens_per_s": round(lengths.sum().item() / elapsed, 1),  # response tokens generated and trained on, all ranks
            "step_time_s": round(elapsed, 3),
        }

    def train(self, resume_from: str | None = None) -> PPOOutput:
        from tqdm.auto import tqdm

        if resume_from:
            self._load_checkpoint(Path(resume_from))
        bs = self.global_batch
        bar = tqdm(
            total=self.max_steps, initial=self.step, desc="ppo", unit="step", dynamic_ncols=True, disable=not is_main_process()
        )
        order: list[int] = []
        # The prompt order is a function of the seed and the step alone, so a resumed run draws the same batches.
        epoch_generator = torch.Generator().manual_seed(self.recipe.train.seed)
        for _ in range(self.step * bs // len(self.prompts) + 1):
            order = torch.randperm(len(self.prompts), generator=epoch_generator).tolist()
        while self.step < self.max_steps:
            start = (self.step * bs) % len(self.prompts)
            batch = order[start : start + bs]
            if len(batch) < bs:  # wrap into the next pass over the prompts
                order = torch.randperm(len(self.prompts), generator=epoch_generator).tolist()
                batch += order[: bs - len(batch)]
            row = self.ppo_step(batch[self.rank :: self.world])  # this rank's share of the global batch
            self.step += 1
            if self.step % self.recipe.train.logging_steps == 0:
                self.run.append_metrics({"step": self.step} | row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.3f}", refresh=False)
            if self.step % self.recipe.train.save_steps == 0 or self.step == self.max_steps:
                self._save_checkpoint()
        bar.close()
        return PPOOutput(global_step=self.step)

    # -- held-out reward ---------------------------------------------------------------------------

    @torch.no_grad()
    def held_out_reward(self, prompts: list[list[dict]], seed: int, batch_size: int) -> dict:
        """Mean score (before penalties) and KL to the reference of responses sampled for `prompts`
        with a fixed seed: the same draw before and after training. Every rank must call it: each
        scores its share of the prompts, and the results are gathered."""
        from accelerate.utils import gather_object

        self.wrapped.eval()
        torch.manual_seed(seed + self.rank)
        prompts = prompts[self.rank :: self.world]
        scores, kls, lengths = [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)]
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s : s + batch_size]
            ids = [
                self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in chunk
            ]
            prompt_ids, prompt_mask, response, mask, _ = self.generate(ids)
            scores.append(self.scorer(chunk, self.completions_of(response, mask)))
            logits, _ = self._forward(prompt_ids, prompt_mask, response, mask)
            ref_logits, _ = self._forward(prompt_ids, prompt_mask, response, mask, reference=True)
            kls.append(((logprobs_of(logits, response) - logprobs_of(ref_logits, response)) * mask).sum(1).cpu())
            lengths.append(mask.sum(1).float().cpu())
        scores, kls, lengths = (torch.tensor(gather_object(torch.cat(t).tolist())) for t in (scores, kls, lengths))
        return {
            "reward_mean": round(scores.mean().item(), 5),
            "reward_std": round(scores.std().item(), 5) if len(scores) > 1 else 0.0,
            "kl": round(kls.mean().item(), 5),
            "response_length": round(lengths.mean().item(), 2),
            "n": len(scores),
        }

    # -- checkpoints and final/ --------------------------------------------------------------------

    def _trainable_state(self) -> dict:
        return {
            n: p.detach().cpu().clone()
            for n, p in self.accelerator.unwrap_model(self.wrapped).named_parameters()
            if p.requires_grad
        }

    def _save_checkpoint(self) -> None:
        from accelerate.utils import gather_object

        rng_states = gather_object([torch.get_rng_state()])  # every rank samples its own rollouts
        if not is_main_process():
            return
        name = f"checkpoint-{self.step}"
        staged = self.run.staging / name
        staged.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "trainable": self._trainable_state(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "kl_coef": self.kl_ctl.value,
                "step": self.step,
                "generator": self.generator.get_state(),
                "torch_rng": rng_states,
            },
            staged / "ppo_state.pt",
        )
        self.run.commit_checkpoint(name, self.recipe.train.save_total_limit)

    def _load_checkpoint(self, path: Path) -> None:
        state = torch.load(path / "ppo_state.pt", weights_only=False)
        params = dict(self.accelerator.unwrap_model(self.wrapped).named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.value = state["kl_coef"]
        self.step = state["step"]
        self.generator.set_state(state["generator"])
        rng = state["torch_rng"]  # one state per rank of the run that saved it
        torch.set_rng_state(rng[self.rank % len(rng)])

    def save_model(self, path: str) -> None:
        """final/: the policy (adapter or full model) as plain transformers/PEFT saves it, plus the value head."""
        if not is_main_process():
            return
        from safetensors.torch import save_file

        unwrapped = self.accelerator.unwrap_model(self.wrapped)
        unwrapped.policy.save_pretrained(path)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in unwrapped.value_head.state_dict().items()},
            str(Path(path) / "value_head.safetensors"),
        )
