import math

import pytest
import torch

from relsum_core.losses import dpo_loss, grpo_loss, kl_k3, masked_mean, sequence_logprob


def test_kl_k3_hand_value_and_zero_at_equality():
    logp = torch.tensor([math.log(0.5), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.3)])
    # delta = log(0.25/0.5) = -log 2: exp(delta) - delta - 1 = 0.5 + log 2 - 1
    expected = torch.tensor([0.5 + math.log(2) - 1, 0.0])
    assert torch.allclose(kl_k3(logp, ref), expected, atol=1e-6)


def test_masked_mean_empty_mask_is_zero():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_on_policy_loss_is_minus_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.1, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])
    loss, m = grpo_loss(logp, None, adv, mask, loss_type="dapo")
    # 3 tokens at A=1 and 2 tokens at A=-2 -> -(3*1 + 2*(-2)) / 5
    assert loss.item() == pytest.approx(1 / 5)
    loss.backward()
    # d loss / d logp = -A / 5 on live tokens (ratio 1), 0 on the masked one
    assert torch.allclose(logp.grad, torch.tensor([[-0.2, -0.2, -0.2], [0.4, 0.4, 0.0]]))
    assert m["clip_fraction"].item() == 0.0


def test_aggregations_hand_worked():
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([1.0, 3.0])
    # per-token loss = -A on live tokens: row0 four tokens of -1, row1 one token of -3
    dapo, _ = grpo_loss(logp, None, adv, mask, loss_type="dapo")
    grpo, _ = grpo_loss(logp, None, adv, mask, loss_type="grpo")
    dr, _ = grpo_loss(logp, None, adv, mask, loss_type="dr_grpo")
    dr8, _ = grpo_loss(logp, None, adv, mask, loss_type="dr_grpo", max_completion_length=8)
    norm, _ = grpo_loss(logp, None, adv, mask, loss_type="dapo", token_normalizer=10)
    assert dapo.item() == pytest.approx(-7 / 5)
    assert grpo.item() == pytest.approx((-1 + -3) / 2)
    assert dr.item() == pytest.approx(-7 / (2 * 4))
    assert dr8.item() == pytest.approx(-7 / (2 * 8))
    assert norm.item() == pytest.approx(-7 / 10)


def test_clipping_hand_worked():
    # ratio 1.5 with A=+1 clips at 1.2; ratio 0.5 with A=-1 clips at 0.8 (loss 0.8);
    # ratio 0.5 with A=+1 is not clipped (loss -0.5); ratio 1.5 with A=-1 not clipped (loss 1.5).
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(4, 1)
    loss, m = grpo_loss(logp, old, adv, mask, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5) / 4)
    assert m["clip_fraction"].item() == pytest.approx(0.5)
    assert m["clip_ratio_high"].item() == pytest.approx(0.25)
    assert m["clip_ratio_low"].item() == pytest.approx(0.25)
    loss.backward()
    # clipped tokens pass no gradient; unclipped ones -A * ratio / 4
    assert torch.allclose(logp.grad.squeeze(1), torch.tensor([0.0, 0.0, -0.5 / 4, 1.5 / 4]), atol=1e-6)


def test_asymmetric_clip_high():
    old = torch.zeros(1, 1)
    logp = torch.log(torch.tensor([[1.25]]))
    loss, _ = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), epsilon_low=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(-1.25)  # inside the wider upper bound


def test_kl_and_entropy_terms():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    ent = torch.tensor([[2.0, 4.0]])
    mask = torch.tensor([[1, 0]])
    loss, m = grpo_loss(logp, None, torch.tensor([0.0]), mask, ref_logp=ref, beta=0.1,
                        entropy=ent, entropy_coef=0.01)
    kl0 = 0.5 + math.log(2) - 1
    assert m["kl"].item() == pytest.approx(kl0, rel=1e-5)
    assert m["entropy"].item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(0.1 * kl0 - 0.01 * 2.0, rel=1e-5)


def test_kl_penalty_gradient_pulls_towards_the_reference():
    # d/dlogp of beta * k3 = beta * (1 - exp(ref - logp)) per token, over the token count (dapo)
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.4]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.4, 0.4]]))
    mask = torch.tensor([[1, 1, 0]])
    loss, _ = grpo_loss(logp, None, torch.tensor([0.0]), mask, ref_logp=ref, beta=0.1)
    loss.backward()
    want = 0.1 * (1 - torch.exp(ref - logp.detach())) * mask / 2
    torch.testing.assert_close(logp.grad, want)


def test_grpo_loss_bad_input():
    logp = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, None, torch.zeros(2), mask, loss_type="ppo")
    with pytest.raises(ValueError, match="mask must have shape"):
        grpo_loss(logp, None, torch.zeros(2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(logp, None, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, None, torch.zeros(2), mask, beta=0.1)
    with pytest.raises(ValueError, match="empty batch"):
        grpo_loss(torch.zeros(0, 3), None, torch.zeros(0), torch.ones(0, 3))


def test_sequence_logprob():
    tok = torch.tensor([[-1.0, -2.0, -5.0]])
    assert sequence_logprob(tok, torch.tensor([[1, 1, 0]])).item() == -3.0


def test_dpo_hand_worked():
    pc, pr = torch.tensor([-10.0]), torch.tensor([-12.0])
    rc, rr = torch.tensor([-11.0]), torch.tensor([-11.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # margin = 2, loss = -log sigmoid(1) = log(1 + e^-1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))
    assert m["reward_chosen"].item() == pytest.approx(0.5)
    assert m["reward_rejected"].item() == pytest.approx(-0.5)
    assert m["reward_accuracy"].item() == 1.0
    smooth, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.exp(1)))


def test_dpo_subtracts_the_reference_margin_and_averages_pairs():
    # pair 1: policy margin 2, reference margin 1 -> 1; pair 2: 0 - (-2) -> 2
    pc, pr = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0])
    rc, rr = torch.tensor([-10.0, -6.0]), torch.tensor([-11.0, -4.0])
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=1.0)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.0))) / 2)


def test_dpo_gradient_pushes_chosen_up():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=1.0)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.5) and pr.grad.item() == pytest.approx(0.5)


def test_dpo_bad_input():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="ref_rejected must have shape"):
        dpo_loss(x, x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="non-empty"):
        dpo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)


def test_per_token_advantages_are_accepted_and_match_broadcast():
    logp = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    per_seq, _ = grpo_loss(logp, None, torch.tensor([1.0, 2.0]), mask)
    per_tok, _ = grpo_loss(logp, None, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]), mask)
    assert per_seq.item() == pytest.approx(-9 / 6) and per_tok.item() == pytest.approx(-9 / 6)
    varied, _ = grpo_loss(logp, None, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), mask)
    assert varied.item() == pytest.approx(-21 / 6)


def test_grpo_loss_rejects_entropy_coef_without_entropy_and_negative_epsilon():
    logp, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="needs entropy"):
        grpo_loss(logp, None, torch.zeros(2), mask, entropy_coef=0.01)
    with pytest.raises(ValueError, match="must be >= 0"):
        grpo_loss(logp, None, torch.zeros(2), mask, epsilon_low=-0.1)
    with pytest.raises(ValueError, match="must be >= 0"):
        grpo_loss(logp, None, torch.zeros(2), mask, epsilon_high=-0.1)


def test_epsilon_high_zero_is_not_the_default():
    # epsilon_high=0.0 is an explicit bound (ratio capped at 1), not "use epsilon_low"
    old = torch.zeros(1, 1)
    logp = torch.log(torch.tensor([[1.1]]))
    loss, m = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), epsilon_low=0.2, epsilon_high=0.0)
    assert loss.item() == pytest.approx(-1.0)
    assert m["clip_ratio_high"].item() == 1.0


def test_empty_completions_in_each_aggregation():
    # row 1 has no completion tokens: it adds nothing, but still counts as a sequence (grpo, dr_grpo)
    logp = torch.zeros(2, 2, requires_grad=True)
    mask = torch.tensor([[1, 1], [0, 0]])
    adv = torch.tensor([1.0, 5.0])
    dapo, _ = grpo_loss(logp, None, adv, mask, loss_type="dapo")
    grpo, _ = grpo_loss(logp, None, adv, mask, loss_type="grpo")
    dr, _ = grpo_loss(logp, None, adv, mask, loss_type="dr_grpo")
    assert dapo.item() == pytest.approx(-2 / 2)
    assert grpo.item() == pytest.approx((-1 + 0) / 2)
    assert dr.item() == pytest.approx(-2 / (2 * 2))
    # a batch without any completion token: loss 0 and a finite (zero) gradient, never NaN
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        logp.grad = None
        loss, m = grpo_loss(logp, None, adv, torch.zeros(2, 2), loss_type=loss_type)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 2))
        assert all(math.isfinite(v.item()) for v in m.values())


def test_clip_metrics_use_their_own_bound_and_the_mask():
    # ratio 1.25 is inside the upper bound 1.28: not clipped although it is above 1 + epsilon_low
    old = torch.zeros(1, 1)
    logp = torch.log(torch.tensor([[1.25]]))
    _, m = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), epsilon_low=0.2, epsilon_high=0.28)
    assert m["clip_ratio_high"].item() == 0.0 and m["clip_fraction"].item() == 0.0
    # on policy the ratio is exactly 1: never clipped, even with zero-width bounds
    logp = torch.zeros(2, 2, requires_grad=True)
    _, m = grpo_loss(logp, None, torch.tensor([-1.0, 1.0]), torch.ones(2, 2), epsilon_low=0.0,
                     epsilon_high=0.0)
    assert m["clip_fraction"].item() == 0.0 and m["clip_ratio_low"].item() == 0.0
    # ratio_mean averages live tokens only: ratios 2 (live) and 5 (masked)
    _, m = grpo_loss(torch.log(torch.tensor([[2.0, 5.0]])), torch.zeros(1, 2), torch.tensor([1.0]),
                     torch.tensor([[1, 0]]))
    assert m["ratio_mean"].item() == pytest.approx(2.0)


def test_metrics_are_detached():
    logp = torch.zeros(2, 3, requires_grad=True)
    _, m = grpo_loss(logp, None, torch.tensor([1.0, -1.0]), torch.ones(2, 3), ref_logp=torch.zeros(2, 3),
                     beta=0.1)
    assert not any(v.requires_grad for v in m.values())
    pc = torch.tensor([-5.0], requires_grad=True)
    _, m = dpo_loss(pc, torch.tensor([-6.0]), torch.tensor([-5.0]), torch.tensor([-5.0]))
    assert not any(v.requires_grad for v in m.values())


def test_dpo_reward_metrics_by_hand():
    # pair 1: chosen reward 0.5 * (-10 + 11) = 0.5, rejected 0.5 * (-12 + 13) = 0.5 (a tie, not accurate)
    # pair 2: chosen 0.5 * (-10 + 11) = 0.5, rejected 0.5 * (-12 + 11) = -0.5
    pc, pr = torch.tensor([-10.0, -10.0]), torch.tensor([-12.0, -12.0])
    rc, rr = torch.tensor([-11.0, -11.0]), torch.tensor([-13.0, -11.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx((math.log(2) + math.log1p(math.exp(-1.0))) / 2)
    assert m["reward_chosen"].item() == pytest.approx(0.5)
    assert m["reward_rejected"].item() == pytest.approx(0.0)
    assert m["reward_margin"].item() == pytest.approx(0.5)
    assert m["reward_accuracy"].item() == pytest.approx(0.5)
    # policy == reference (the first step): no pair is ranked correctly yet
    x = torch.tensor([-3.0, -4.0])
    _, m = dpo_loss(x, x, x, x)
    assert m["reward_accuracy"].item() == 0.0


def test_dpo_large_margin_is_finite():
    # -log sigmoid(-300) = softplus(300) ~ 300; log(sigmoid(.)) would underflow to inf in fp32
    pc = torch.tensor([-300.0], requires_grad=True)
    loss, _ = dpo_loss(pc, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(300.0)
    assert pc.grad.item() == pytest.approx(-1.0)


def test_dpo_bad_input_shape_and_label_smoothing():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    y = torch.zeros(2, 1)
    with pytest.raises(ValueError, match=r"non-empty \[B\]"):
        dpo_loss(y, y, y, y)


def test_nan_or_negative_settings_are_refused():
    """Every comparison with NaN is False: checks written as `x < 0` would let a NaN setting through."""
    logp, mask, ref = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3)
    for kwargs, match in (({"beta": math.nan, "ref_logp": ref}, "beta must be >= 0"),
                          ({"beta": -0.1, "ref_logp": ref}, "beta must be >= 0"),
                          ({"epsilon_low": math.nan}, "must be >= 0"),
                          ({"epsilon_high": math.nan}, "must be >= 0"),
                          ({"entropy_coef": math.nan, "entropy": ref}, "entropy_coef must be finite")):
        with pytest.raises(ValueError, match=match):
            grpo_loss(logp, None, torch.zeros(2), mask, **kwargs)
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(x, x, x, x, beta=math.nan)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=math.nan)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("pad", [float("nan"), float("-inf"), float("inf")])
def test_padding_values_never_reach_loss_metrics_or_gradient(loss_type, pad):
    # An eager log-softmax leaves -inf (or NaN) at padding; x * 0 would carry it into the sums.
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    logp0, old, ref, ent = (-torch.rand(2, 4, generator=g, dtype=torch.float64) for _ in range(4))
    adv_tok = torch.randn(2, 4, generator=g, dtype=torch.float64)

    def run(fill):
        def dirty(t):
            return t.masked_fill(~mask, pad) if fill else t.clone()
        logp = dirty(logp0).requires_grad_()
        loss, metrics = grpo_loss(logp, dirty(old), dirty(adv_tok), mask, ref_logp=dirty(ref), beta=0.1,
                                  entropy=dirty(ent), entropy_coef=0.01, loss_type=loss_type)
        loss.backward()
        return loss.detach(), metrics, logp.grad, sequence_logprob(dirty(logp0), mask)

    clean, dirty_run = run(False), run(True)
    assert torch.isfinite(dirty_run[0]) and torch.equal(dirty_run[0], clean[0])
    assert dirty_run[1].keys() == clean[1].keys()
    for k in clean[1]:
        assert torch.equal(dirty_run[1][k], clean[1][k]), k
    assert torch.equal(dirty_run[2], clean[2]) and not dirty_run[2][~mask].any()
    assert torch.equal(dirty_run[3], clean[3])
    assert masked_mean(torch.tensor([2.0, pad]), torch.tensor([True, False])) == 2.0
