"""Multi-Level Preference Optimization (MLPO): the two loss terms as pure tensor functions.

With the implicit reward ``r(y) = log pi(y|i,x) - log pi_ref(y|i,x)`` (log-probs summed over the
answer tokens) and the k rejected answers ordered from least to most wrong:

    explicit  L_E = - sum_j       log sigmoid(gamma * (r(y_w)  - r(y_lj)))
    implicit  L_I = - sum_{j < m} log sigmoid(gamma * (r(y_lj) - r(y_lm)))
    loss          = mean over the batch of (L_E + implicit_weight * L_I)

Samples that kept fewer than k rejected answers carry a ``rejected_mask`` that is False at the
missing slots, and every pair that touches a missing slot drops out of both sums. With k = 1 the
explicit term is the single-pair DPO loss with ``beta = gamma`` (Rafailov et al., 2023).

    from hscr.mlpo import mlpo_loss
    out = mlpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, mask, gamma=0.1)
    out.loss.backward()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def explicit_losses(
    chosen_logratios: torch.Tensor,      # (B,)   r(y_w)
    rejected_logratios: torch.Tensor,    # (B, K) r(y_lj)
    rejected_mask: torch.Tensor,         # (B, K) bool
    gamma: float,
) -> torch.Tensor:
    """Per-sample explicit term ``-sum_j log sigmoid(gamma (r_w - r_lj))``: ``(B,)``."""
    margins = chosen_logratios.unsqueeze(1) - rejected_logratios             # (B, K)
    losses = -F.logsigmoid(gamma * margins)                                  # (B, K)
    # torch.where instead of a product, so a non-finite value in a missing slot cannot leak in.
    return torch.where(rejected_mask, losses, torch.zeros_like(losses)).sum(dim=1)


def implicit_pair_mask(rejected_mask: torch.Tensor) -> torch.Tensor:
    """Valid (j, m) pairs with j < m and both answers present: ``(B, K, K)`` bool."""
    k = rejected_mask.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=rejected_mask.device).triu(diagonal=1)  # (K, K)
    both = rejected_mask.unsqueeze(2) & rejected_mask.unsqueeze(1)           # (B, K, K)
    return both & upper


def implicit_losses(
    rejected_logratios: torch.Tensor,    # (B, K) r(y_lj), least wrong first
    rejected_mask: torch.Tensor,         # (B, K) bool
    gamma: float,
) -> torch.Tensor:
    """Per-sample implicit term ``-sum_{j<m} log sigmoid(gamma (r_lj - r_lm))``: ``(B,)``."""
    margins = rejected_logratios.unsqueeze(2) - rejected_logratios.unsqueeze(1)  # (B, K, K) r_j - r_m
    losses = -F.logsigmoid(gamma * margins)                                  # (B, K, K)
    pairs = implicit_pair_mask(rejected_mask)
    return torch.where(pairs, losses, torch.zeros_like(losses)).sum(dim=(1, 2))


@dataclass
class MLPOOutput:
    """The batch loss, its per-sample terms and the detached metrics (slash names)."""

    loss: torch.Tensor                   # scalar
    explicit: torch.Tensor               # (B,)
    implicit: torch.Tensor               # (B,)
    metrics: dict[str, torch.Tensor]     # scalars, detached


def mlpo_loss(
    chosen_logps: torch.Tensor,          # (B,)   summed log-probs under the policy
    rejected_logps: torch.Tensor,        # (B, K)
    ref_chosen_logps: torch.Tensor,      # (B,)   summed log-probs under the reference model
    ref_rejected_logps: torch.Tensor,    # (B, K)
    rejected_mask: torch.Tensor | None = None,  # (B, K) bool; None: all slots present
    gamma: float = 0.1,
    implicit_weight: float = 1.0,
) -> MLPOOutput:
    """Compute the MLPO loss averaged over the batch, and the metrics TRL's DPO trainer logs.

    ``rewards/*`` are ``gamma * r(y)`` as TRL reports ``beta * logratio``; ``rewards/accuracies``
    is the share of valid (chosen, rejected) pairs with a higher chosen reward, and
    ``rewards/implicit_accuracies`` the share of valid (less wrong, more wrong) pairs ranked
    correctly (NaN when the batch has no such pair).
    """
    if rejected_mask is None:
        rejected_mask = torch.ones_like(rejected_logps, dtype=torch.bool)
    rejected_mask = rejected_mask.bool()
    chosen_logratios = chosen_logps - ref_chosen_logps                       # (B,)
    rejected_logratios = rejected_logps - ref_rejected_logps                 # (B, K)
    # Missing slots may hold NaN reference values; keep them out of every expression.
    rejected_logratios = torch.where(rejected_mask, rejected_logratios, torch.zeros_like(rejected_logratios))

    explicit = explicit_losses(chosen_logratios, rejected_logratios, rejected_mask, gamma)
    implicit = implicit_losses(rejected_logratios, rejected_mask, gamma)
    loss = (explicit + implicit_weight * implicit).mean()

    with torch.no_grad():
        metrics = _reward_metrics(chosen_logratios, rejected_logratios, rejected_mask, gamma)
        metrics["loss"] = loss.detach()
        metrics["loss/explicit"] = explicit.mean()
        metrics["loss/implicit"] = implicit.mean()
    return MLPOOutput(loss=loss, explicit=explicit, implicit=implicit, metrics=metrics)


def _reward_metrics(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    rejected_mask: torch.Tensor,
    gamma: float,
) -> dict[str, torch.Tensor]:
    chosen_rewards = gamma * chosen_logratios.detach()                       # (B,)
    rejected_rewards = gamma * rejected_logratios.detach()                   # (B, K)
    valid = rejected_mask.float()
    num_valid = valid.sum().clamp(min=1.0)
    margins = chosen_rewards.unsqueeze(1) - rejected_rewards                 # (B, K)
    pairs = implicit_pair_mask(rejected_mask).float()                        # (B, K, K)
    ordered = (rejected_rewards.unsqueeze(2) > rejected_rewards.unsqueeze(1)).float()
    num_pairs = pairs.sum()
    implicit_accuracy = (ordered * pairs).sum() / num_pairs if num_pairs > 0 else num_pairs.new_tensor(float("nan"))
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": (rejected_rewards * valid).sum() / num_valid,
        "rewards/margins": (margins * valid).sum() / num_valid,
        "rewards/accuracies": ((margins > 0).float() * valid).sum() / num_valid,
        "rewards/implicit_accuracies": implicit_accuracy,
    }
