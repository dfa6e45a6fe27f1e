"""PPO's mathematics against small examples worked out by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from llmtune.methods.trainers.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_of,
    explained_variance,
    gae,
    logprobs_of,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    score_with_penalties,
    value_loss,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_two_token_response_with_padding():
    # gamma 0.9, lambda 0.8; the third position is padding and its reward/value must not count.
    # t=1 (last): delta = 2 + 0.9*0 - 1.0 = 1.0            A1 = 1.0
    # t=0:        delta = 1 + 0.9*1.0 - 0.5 = 1.4          A0 = 1.4 + 0.9*0.8*1.0 = 2.12
    # returns = A + V = [2.62, 2.0]
    advantages, returns = gae(t([1.0, 2.0, 9.0]), t([0.5, 1.0, 7.0]), t([1, 1, 0]), gamma=0.9, lam=0.8)
    assert torch.allclose(advantages, t([2.12, 1.0, 0.0]))
    assert torch.allclose(returns, t([2.62, 2.0, 0.0]))


def test_gae_credit_flows_back_discounted_by_gamma_lambda():
    # Reward 1 on the last of three tokens, zero values: A2 = 1, A1 = 0.72 * 1, A0 = 0.72^2 = 0.5184.
    advantages, returns = gae(t([0.0, 0.0, 1.0]), t([0.0, 0.0, 0.0]), t([1, 1, 1]), gamma=0.9, lam=0.8)
    assert torch.allclose(advantages, t([0.5184, 0.72, 1.0]))
    assert torch.allclose(returns, advantages)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards, values, mask = t([1.0, -2.0, 4.0, 0.0]), t([0.3, 0.1, -0.2, 5.0]), t([1, 1, 1, 0])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = t([3.0, 2.0, 4.0, 0.0])
    assert torch.allclose(returns, reward_to_go)
    assert torch.allclose(advantages, (reward_to_go - values) * mask)


def test_gae_rows_are_independent():
    a = (t([1.0, 2.0, 9.0]), t([0.5, 1.0, 7.0]), t([1, 1, 0]))
    b = (t([0.0, 0.0, 1.0]), t([0.0, 0.0, 0.0]), t([1, 1, 1]))
    together, _ = gae(*(torch.cat([x, y]) for x, y in zip(a, b)), gamma=0.9, lam=0.8)
    assert torch.allclose(together[0], gae(*a, gamma=0.9, lam=0.8)[0][0])
    assert torch.allclose(together[1], gae(*b, gamma=0.9, lam=0.8)[0][0])


def test_per_token_rewards_kl_penalty_and_score_on_last_token():
    # kl = logp - ref = [0.5, -1.0, (pad)]; rewards = -0.1 * kl, plus the score 3 on the last real token:
    # [-0.05, 0.1 + 3 = 3.1, 0]
    rewards, kl = per_token_rewards(torch.tensor([3.0]), t([-1.0, -2.0, -0.5]), t([-1.5, -1.0, -9.0]), t([1, 1, 0]), kl_coef=0.1)
    assert torch.allclose(rewards, t([-0.05, 3.1, 0.0]))
    assert torch.allclose(kl, t([0.5, -1.0, 0.0]))


def test_policy_loss_clips_and_reports():
    # ratios r = [1.5, 0.5, 1.1], advantages A = [1, -1, 2], eps = 0.2:
    #   token 0: max(-1.5, -1.2) = -1.2 (clipped)   token 1: max(0.5, 0.8) = 0.8 (clipped)
    #   token 2: max(-2.2, -2.2) = -2.2 (not clipped: 1.1 is inside [0.8, 1.2])
    # loss = (-1.2 + 0.8 - 2.2) / 3; clipfrac = 2/3
    # approx_kl = mean((r - 1) - ln r) = mean(0.5 - ln 1.5, -0.5 - ln 0.5, 0.1 - ln 1.1)
    logprobs = torch.log(t([1.5, 0.5, 1.1])).requires_grad_()
    loss, stats = policy_loss(logprobs, t([0.0, 0.0, 0.0]), t([1.0, -1.0, 2.0]), t([1, 1, 1]), clip_range=0.2)
    assert loss.item() == pytest.approx(-2.6 / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    expected_kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5)) + (0.1 - math.log(1.1))) / 3
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, abs=1e-6)
    # Clipped tokens pass no gradient; token 2's is d/dlogp (-A r / 3) = -2 * 1.1 / 3.
    loss.backward()
    assert torch.allclose(logprobs.grad, t([0.0, 0.0, -2.2 / 3]))


def test_policy_loss_ignores_padding():
    loss, stats = policy_loss(t([0.1, 5.0]), t([0.0, 0.0]), t([1.0, 100.0]), t([1, 0]), clip_range=0.2)
    assert loss.item() == pytest.approx(-math.exp(0.1), abs=1e-6)
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_clipped():
    # old V = [0, 0], V = [1.0, 0.1], returns R = [2, 0.5], c = 0.2:
    #   token 0: unclipped (1 - 2)^2 = 1, clipped (0.2 - 2)^2 = 3.24 -> 3.24 (clipped)
    #   token 1: V moved 0.1 < c: both (0.1 - 0.5)^2 = 0.16
    # loss = 0.5 * (3.24 + 0.16) / 2 = 0.85; value clipfrac = 1/2
    loss, stats = value_loss(t([1.0, 0.1]), t([0.0, 0.0]), t([2.0, 0.5]), t([1, 1]), clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.85, abs=1e-6)
    assert stats["value_clipfrac"].item() == pytest.approx(0.5)


def test_whiten():
    # masked [1, 2, 3]: mean 2, unbiased variance 1 -> [-1, 0, 1]; padding stays 0.
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    assert torch.allclose(masked_whiten(x, mask), t([-1.0, 0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False), t([1.0, 2.0, 3.0, 0.0]), atol=1e-6)


def test_whiten_over_ranks_uses_the_whole_batch():
    """Two ranks (threads here) each whiten their half with the sums of both: the same numbers as one
    process whitening the whole batch; per-rank whitening would not be."""
    import threading

    x, mask = t([1.0, 2.0, 3.0], [4.0, 9.0, 7.0]), t([1, 1, 1], [1, 1, 0])
    whole = masked_whiten(x, mask)  # over [1, 2, 3, 4, 9]: mean 3.8, unbiased variance 9.7
    assert whole[1, 1].item() == pytest.approx((9 - 3.8) / 9.7**0.5, abs=1e-6)
    barrier, shared, out = threading.Barrier(2), [None, None], [None, None]

    def rank(r: int):
        def sum_over_ranks(v):
            shared[r] = v
            barrier.wait()
            total = shared[0] + shared[1]
            barrier.wait()
            return total

        out[r] = masked_whiten(x[r : r + 1], mask[r : r + 1], sum_over_ranks=sum_over_ranks)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert torch.allclose(torch.cat(out), whole, atol=1e-6)
    assert not torch.allclose(masked_whiten(x[1:], mask[1:]), whole[1:], atol=1e-2)  # what per-rank whitening gives


def test_explained_variance():
    returns, mask = t([1.0, 2.0, 3.0]), t([1, 1, 1])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    # Predicting the mean everywhere explains nothing: 1 - Var([-1, 0, 1]) / Var([1, 2, 3]) = 0.
    assert explained_variance(t([2.0, 2.0, 2.0]), returns, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_and_logprobs():
    assert entropy_of(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))
    # probabilities [1/4, 3/4]: H = -(0.25 ln 0.25 + 0.75 ln 0.75)
    logits = torch.tensor([[[0.0, math.log(3)]]])
    assert entropy_of(logits).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    assert logprobs_of(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75), abs=1e-6)


def test_penalties_for_missing_eos_and_overlong_responses():
    # row 1 has no EOS: 1 - 2 = -1; row 2 is 2 tokens past overlong_after=8: 1 - 2 * 0.5 = 0
    scores = score_with_penalties(
        t(1.0, 1.0, 1.0),
        torch.tensor([True, False, True]),
        torch.tensor([3, 5, 10]),
        missing_eos_penalty=2.0,
        overlong_after=8,
        overlong_penalty=0.5,
    )
    assert torch.allclose(scores, t(1.0, -1.0, 0.0))


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    # KL 9 against target 6: error 0.5 clipped to 0.2; 100 episodes over horizon 10000 -> x(1 + 0.2 * 0.01)
    adaptive = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    adaptive.update(9.0, 100)
    assert adaptive.value == pytest.approx(0.2 * 1.002)
    adaptive.update(6.0, 100)  # on target: unchanged
    assert adaptive.value == pytest.approx(0.2 * 1.002)
    adaptive.update(4.5, 100)  # error 4.5/6 - 1 = -0.25 -> -0.2
    assert adaptive.value == pytest.approx(0.2 * 1.002 * 0.998)
