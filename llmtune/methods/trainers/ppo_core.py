"""The mathematics of PPO for language models, as small pure functions on tensors.

Shapes: every per-token tensor is [batch, T] over the *response* tokens only, left-aligned (token
0 is the first generated token) with `mask` 1 on real response tokens and 0 on padding after the
end. Each function is checked by hand against a small worked example in tests/test_ppo_core.py.

References: Schulman et al. 2017 (PPO: clipped surrogate), Schulman et al. 2016 (GAE), Ziegler
et al. 2019 (per-token KL penalty, adaptive KL controller), and the structure of TRL's former
PPOTrainer (removed in TRL 1.13), whose conventions (whitening, value clipping) we keep.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1."""
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked positions (Bessel-corrected unless `unbiased=False`)."""
    return masked_moments(x, mask, unbiased)[1]


def masked_moments(
    x: torch.Tensor,
    mask: torch.Tensor,
    unbiased: bool = True,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of `x` over the masked positions (Bessel-corrected unless `unbiased=False`).

    `sum_over_ranks` sums a tensor over the processes of a distributed run: each rank holds part of
    the batch, and the figures are those of the whole batch, as one process holding it would get.
    """
    total = sum_over_ranks or (lambda t: t)
    n, x_sum = total(torch.stack([mask.sum(), (x * mask).sum()]).float())
    mean = x_sum / n
    var = total(((x - mean) ** 2 * mask).sum().float()) / n
    if unbiased:
        var = var * n / (n - 1).clamp(min=1)
    return mean, var


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scale to unit variance over the masked positions; also centre on 0 when `shift_mean`.
    With `sum_over_ranks`, the mean and variance are the whole distributed batch's (see masked_moments)."""
    mean, var = masked_moments(x, mask, sum_over_ranks=sum_over_ranks)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under `logits` ([B, T, V] predicting each of `tokens` [B, T])."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the categorical distribution at each position: logsumexp(z) - sum p z."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def score_with_penalties(
    scores: torch.Tensor,
    has_eos: torch.Tensor,
    lengths: torch.Tensor,
    missing_eos_penalty: float,
    overlong_after: int | None,
    overlong_penalty: float,
) -> torch.Tensor:
    """The sequence-level reward after shaping penalties.

    A response that never emitted EOS (cut at max_new_tokens) loses `missing_eos_penalty`; one
    longer than `overlong_after` tokens loses `overlong_penalty` per token beyond it.
    """
    scores = scores - missing_eos_penalty * (~has_eos).float()
    if overlong_after is not None:
        scores = scores - overlong_penalty * (lengths - overlong_after).clamp(min=0).float()
    return scores


def per_token_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards per response token: -kl_coef * (log pi - log pi_ref) at every token, plus the
    sequence's score on its last real token. Returns (rewards, kl) with kl the per-token
    log-ratio (its sum over a response estimates KL(pi || pi_ref) for that response)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each response; returns (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t, with V after the last real token = 0 (the episode ends);
    A_t = delta_t + gamma * lam * A_{t+1}; returns_t = A_t + V_t (the value targets).
    """
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        # mask[t + 1] is 0 past a response's end: no bootstrap from, and no credit flowing back across, the end.
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(mask[:, 0])
        next_value = values[:, t + 1] * next_mask if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage * next_mask
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-eps, 1+eps)), r = pi/pi_old.

    Also returns `clipfrac` (share of tokens where the clipped term was the larger, i.e. the
    gradient was cut off) and `approx_kl`, the k3 estimator E[(r - 1) - log r] of KL(pi_old || pi)
    (non-negative and unbiased, Schulman's "Approximating KL divergence" note).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range_value: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-c)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R): 1 when the value head predicts the returns, <= 0 when no better than their mean."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019: move the coefficient to keep the measured KL near `target`.

    error = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + error * n_steps / horizon, where
    n_steps is the number of episodes (responses) this update saw.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
