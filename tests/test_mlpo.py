"""Exact values of the MLPO loss terms, computed by hand with ``math``."""

import math

import pytest
import torch

from hscr.mlpo import explicit_losses, implicit_losses, mlpo_loss


def neg_logsigmoid(z: float) -> float:
    """-log sigmoid(z) = log(1 + exp(-z))."""
    return math.log1p(math.exp(-z))


def as_inputs(r_chosen, r_rejected, ref_offset=-2.0):
    """Policy and reference log-probs whose differences are the given implicit rewards."""
    ref_chosen = torch.full((len(r_chosen),), ref_offset, dtype=torch.float64)
    ref_rejected = torch.full((len(r_rejected), len(r_rejected[0])), ref_offset - 1.0, dtype=torch.float64)
    chosen = ref_chosen + torch.tensor(r_chosen, dtype=torch.float64)
    rejected = ref_rejected + torch.tensor(r_rejected, dtype=torch.float64)
    return chosen, rejected, ref_chosen, ref_rejected


def test_k1_equals_single_pair_dpo():
    # Policy/reference log-probs of one pair, as TRL's sigmoid DPO loss takes them.
    chosen, ref_chosen = torch.tensor([-1.0]), torch.tensor([-1.5])
    rejected, ref_rejected = torch.tensor([[-3.0]]), torch.tensor([[-2.0]])
    gamma = 0.1

    out = mlpo_loss(chosen, rejected, ref_chosen, ref_rejected, gamma=gamma)

    # DPO: -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))) = -log sigmoid(0.1 * 1.5)
    dpo = -torch.nn.functional.logsigmoid(gamma * ((chosen - rejected[:, 0]) - (ref_chosen - ref_rejected[:, 0])))
    assert out.loss.item() == pytest.approx(dpo.item(), abs=1e-7)
    assert out.loss.item() == pytest.approx(neg_logsigmoid(0.15), abs=1e-7)
    assert out.implicit.item() == 0.0


def test_k1_gradient_matches_dpo_formula():
    chosen = torch.tensor([-1.0], requires_grad=True)
    rejected = torch.tensor([[-3.0]], requires_grad=True)
    gamma = 0.1

    mlpo_loss(chosen, rejected, torch.tensor([-1.5]), torch.tensor([[-2.0]]), gamma=gamma).loss.backward()

    # d/dpi_c [-log sigmoid(g m)] = -g * sigmoid(-g m), with m = 1.5
    expected = -gamma / (1.0 + math.exp(gamma * 1.5))
    assert chosen.grad.item() == pytest.approx(expected, abs=1e-7)
    assert rejected.grad.item() == pytest.approx(-expected, abs=1e-7)


def test_k2_explicit_and_implicit_values():
    chosen, rejected, ref_chosen, ref_rejected = as_inputs([1.0], [[0.0, -2.0]])
    gamma = 0.5

    out = mlpo_loss(chosen, rejected, ref_chosen, ref_rejected, gamma=gamma)

    explicit = neg_logsigmoid(0.5 * 1.0) + neg_logsigmoid(0.5 * 3.0)
    implicit = neg_logsigmoid(0.5 * 2.0)
    assert out.explicit.item() == pytest.approx(explicit, abs=1e-9)
    assert out.implicit.item() == pytest.approx(implicit, abs=1e-9)
    assert out.loss.item() == pytest.approx(explicit + implicit, abs=1e-9)


def test_k3_values_with_misordered_rewards():
    r_w, r = 0.2, [0.1, -0.3, 0.4]
    chosen, rejected, ref_chosen, ref_rejected = as_inputs([r_w], [r])

    out = mlpo_loss(chosen, rejected, ref_chosen, ref_rejected, gamma=1.0)

    explicit = sum(neg_logsigmoid(r_w - x) for x in r)
    # pairs (1,2), (1,3), (2,3): margins 0.4, -0.3, -0.7
    implicit = neg_logsigmoid(0.4) + neg_logsigmoid(-0.3) + neg_logsigmoid(-0.7)
    assert out.explicit.item() == pytest.approx(explicit, abs=1e-9)
    assert out.implicit.item() == pytest.approx(implicit, abs=1e-9)
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(2 / 3)
    assert out.metrics["rewards/implicit_accuracies"].item() == pytest.approx(1 / 3)


def test_masked_slot_drops_its_pairs():
    # Sample 0 kept all three rejected answers; sample 1 kept two, its third slot is NaN.
    chosen, rejected, ref_chosen, ref_rejected = as_inputs([0.5, 1.0], [[0.0, -1.0, -2.0], [0.0, -2.0, 9.0]])
    ref_rejected[1, 2] = float("nan")
    mask = torch.tensor([[True, True, True], [True, True, False]])
    gamma = 0.5

    out = mlpo_loss(chosen, rejected, ref_chosen, ref_rejected, mask, gamma=gamma)

    explicit_0 = neg_logsigmoid(0.25) + neg_logsigmoid(0.75) + neg_logsigmoid(1.25)
    implicit_0 = neg_logsigmoid(0.5) + neg_logsigmoid(1.0) + neg_logsigmoid(0.5)
    explicit_1 = neg_logsigmoid(0.5) + neg_logsigmoid(1.5)
    implicit_1 = neg_logsigmoid(1.0)
    assert out.explicit.tolist() == pytest.approx([explicit_0, explicit_1], abs=1e-9)
    assert out.implicit.tolist() == pytest.approx([implicit_0, implicit_1], abs=1e-9)
    expected = ((explicit_0 + implicit_0) + (explicit_1 + implicit_1)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-9)
    assert math.isfinite(out.metrics["rewards/rejected"].item())


def test_masked_slot_gets_no_gradient():
    chosen, rejected, ref_chosen, ref_rejected = as_inputs([1.0], [[0.0, -2.0, 5.0]])
    ref_rejected[0, 2] = float("nan")
    rejected.requires_grad_(True)
    mask = torch.tensor([[True, True, False]])

    mlpo_loss(chosen, rejected, ref_chosen, ref_rejected, mask, gamma=0.5).loss.backward()

    assert torch.isfinite(rejected.grad).all()
    assert rejected.grad[0, 2].item() == 0.0
    assert rejected.grad[0, 0].item() != 0.0


def test_gamma_scales_margins():
    chosen, rejected, ref_chosen, ref_rejected = as_inputs([1.0], [[0.0, -2.0]])
    for gamma in (0.1, 1.0, 2.0):
        out = mlpo_loss(chosen, rejected, ref_chosen, ref_rejected, gamma=gamma)
        expected = neg_logsigmoid(gamma * 1.0) + neg_logsigmoid(gamma * 3.0) + neg_logsigmoid(gamma * 2.0)
        assert out.loss.item() == pytest.approx(expected, abs=1e-9)
        assert out.metrics["rewards/chosen"].item() == pytest.approx(gamma * 1.0)
        assert out.metrics["rewards/margins"].item() == pytest.approx(gamma * 2.0)


def test_implicit_weight_scales_implicit_term():
    chosen, rejected, ref_chosen, ref_rejected = as_inputs([1.0], [[0.0, -2.0]])
    out = mlpo_loss(chosen, rejected, ref_chosen, ref_rejected, gamma=0.5, implicit_weight=0.25)
    expected = neg_logsigmoid(0.5) + neg_logsigmoid(1.5) + 0.25 * neg_logsigmoid(1.0)
    assert out.loss.item() == pytest.approx(expected, abs=1e-9)


def test_term_functions_on_batch():
    chosen_logratios = torch.tensor([0.0, 1.0])
    rejected_logratios = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    mask = torch.tensor([[True, False], [True, True]])

    explicit = explicit_losses(chosen_logratios, rejected_logratios, mask, gamma=1.0)
    implicit = implicit_losses(rejected_logratios, mask, gamma=1.0)

    assert explicit.tolist() == pytest.approx([math.log(2.0), math.log(2.0) + neg_logsigmoid(-2.0)])
    assert implicit.tolist() == pytest.approx([0.0, neg_logsigmoid(-2.0)])


def test_no_implicit_pairs_gives_nan_accuracy():
    out = mlpo_loss(torch.tensor([0.0]), torch.tensor([[0.0]]), torch.tensor([0.0]), torch.tensor([[0.0]]))
    assert math.isnan(out.metrics["rewards/implicit_accuracies"].item())
    assert out.metrics["loss"].item() == pytest.approx(math.log(2.0))
