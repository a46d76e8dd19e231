"""Policy losses on per-token log-probs: the clipped GRPO/PPO objective and DPO.

Log-probs come from `relsum_kernels.fused_logprob`; these functions only combine them.  Each returns
``(loss, metrics)`` where metrics are detached scalar tensors ready to log.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask holds, else 0.  A select, not a product: a padding position holding -inf or NaN
    would make x * 0 NaN, and its gradient NaN too."""
    return torch.where(mask.to(torch.bool), x, x.new_zeros(()))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (0 when the mask is empty, never NaN)."""
    return _masked(x, mask).sum() / mask.to(x.dtype).sum().clamp_min(1.0)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) with Schulman's k3 estimator: unbiased and never negative."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def _check_token_tensor(name: str, t: torch.Tensor, shape: torch.Size) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor")
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} like logp, got {tuple(t.shape)}")


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    token_normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss of GRPO (PPO without a value model).

    logp, old_logp, ref_logp, entropy, mask: [B, T] per completion token; advantages: [B] (one per
    sequence, broadcast over its tokens) or [B, T].  ``old_logp=None`` means on-policy (ratio 1 with
    the gradient of logp).  Per token:

        -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * KL_k3 - entropy_coef * H

    aggregated as ``loss_type``: "dapo" sums over all tokens of the batch and divides by their count
    (or ``token_normalizer``, e.g. the token count of the whole accumulated batch); "grpo" averages
    each sequence over its own tokens, then over sequences; "dr_grpo" divides the sum by
    B * max_completion_length (default T), a constant, so length carries no bias.  Positions outside
    ``mask`` are never read: padding may hold anything (-inf, NaN) without reaching loss or gradient.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    if logp.numel() == 0:
        raise ValueError("empty batch: logp has no tokens")
    _check_token_tensor("mask", mask, logp.shape)
    if old_logp is not None:
        _check_token_tensor("old_logp", old_logp, logp.shape)
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must be [B] or [B, T] with B={logp.shape[0]}, T={logp.shape[1]}, "
                         f"got {tuple(advantages.shape)}")
    # written so that NaN fails each check too (every comparison with NaN is False)
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    if not math.isfinite(entropy_coef):
        raise ValueError(f"entropy_coef must be finite, got {entropy_coef}")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    if not (epsilon_low >= 0 and eps_high >= 0):
        raise ValueError("epsilon_low and epsilon_high must be >= 0")

    mask = mask.to(torch.bool)
    maskf = mask.to(logp.dtype)
    adv = advantages[:, None] if advantages.dim() == 1 else _masked(advantages, mask)
    adv = adv.to(logp.dtype)
    logp = _masked(logp, mask)
    old = logp.detach() if old_logp is None else _masked(old_logp, mask)
    ratio = torch.exp(logp - old)
    clipped_ratio = ratio.clamp(1.0 - epsilon_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)
    metrics: dict[str, torch.Tensor] = {}
    if ref_logp is not None:
        _check_token_tensor("ref_logp", ref_logp, logp.shape)
        kl = kl_k3(logp, _masked(ref_logp, mask))
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if beta != 0.0:
            per_token = per_token + beta * kl
    if entropy is not None:
        _check_token_tensor("entropy", entropy, logp.shape)
        entropy = _masked(entropy, mask)
        metrics["entropy"] = masked_mean(entropy.detach(), mask)
        if entropy_coef != 0.0:
            per_token = per_token - entropy_coef * entropy

    per_token = per_token * maskf
    if loss_type == "dapo":
        denom = maskf.sum().clamp_min(1.0) if token_normalizer is None else token_normalizer
        loss = per_token.sum() / denom
    elif loss_type == "grpo":
        seq = per_token.sum(1) / maskf.sum(1).clamp_min(1.0)
        loss = seq.mean()
    else:
        length = logp.shape[1] if max_completion_length is None else max_completion_length
        loss = per_token.sum() / (logp.shape[0] * length)

    with torch.no_grad():
        # TRL's convention: a token is clipped when the clip bound is the active term of the min.
        low = (ratio < 1.0 - epsilon_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        metrics["clip_ratio_low"] = masked_mean(low.to(logp.dtype), mask)
        metrics["clip_ratio_high"] = masked_mean(high.to(logp.dtype), mask)
        metrics["clip_fraction"] = masked_mean((low | high).to(logp.dtype), mask)
        metrics["ratio_mean"] = masked_mean(ratio, mask)
    metrics["loss"] = loss.detach()
    return loss, metrics


def sequence_logprob(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token log-probs over each sequence's completion tokens: [B, T] -> [B] (what lies
    outside the mask is never read)."""
    _check_token_tensor("mask", mask, token_logp.shape)
    return _masked(token_logp, mask).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023) on sequence log-prob sums [B] of chosen and rejected completions.

    loss = -(1 - ls) log sigmoid(beta * m) - ls log sigmoid(-beta * m),
    m = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected).
    ``label_smoothing`` is the conservative-DPO noise rate.
    """
    shape = policy_chosen.shape
    if policy_chosen.dim() != 1 or shape[0] == 0:
        raise ValueError(f"sequence log-probs must be non-empty [B] tensors, got {tuple(shape)}")
    for name, t in (("policy_rejected", policy_rejected), ("ref_chosen", ref_chosen),
                    ("ref_rejected", ref_rejected)):
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not beta > 0:  # NaN too
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * margin)
              - label_smoothing * F.logsigmoid(-beta * margin))
    loss = losses.mean()
    with torch.no_grad():
        chosen_reward = beta * (policy_chosen - ref_chosen)
        rejected_reward = beta * (policy_rejected - ref_rejected)
        metrics = {
            "loss": loss.detach(),
            "reward_chosen": chosen_reward.mean(),
            "reward_rejected": rejected_reward.mean(),
            "reward_margin": (chosen_reward - rejected_reward).mean(),
            "reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
        }
    return loss, metrics
