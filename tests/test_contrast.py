import math

import pytest
import torch

from hscr.contrast import apply_dropout, contrast, draw_dropped_positions, num_dropped, p_diff, sample_seed
from hscr.sequences import build_batch, encode_images
from support import random_image, tiny_vlm


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm()


def make_batch(vlm, images, questions, answers):
    adapter, model = vlm.adapter, vlm.model
    features = encode_images(adapter, model, images)
    prompts = adapter.prompt_ids([adapter.prompt(q) for q in questions], features.shape[1])
    answer_ids = [adapter.answer_ids(a) for a in answers]
    rows = list(range(len(images)))
    return build_batch(adapter, model, prompts, answer_ids, features, rows), prompts, answer_ids


QUESTIONS = ["is there a lesion ?", "which organ is shown in this image ?"]
ANSWERS = ["yes", "the left lung"]


def test_ratio_zero_equals_normal_forward(vlm):
    images = [random_image(0), random_image(1)]
    batch, prompts, answers = make_batch(vlm, images, QUESTIONS, ANSWERS)
    result = contrast(vlm.adapter, vlm.model, batch, seeds=[1, 2], ratio=0.0)
    for row in range(2):
        ids = torch.tensor([prompts[row] + answers[row]])
        pixels = vlm.adapter.pixel_values([images[row]])["pixel_values"]
        with torch.no_grad():
            logits = vlm.model(input_ids=ids, pixel_values=pixels).logits[0]   # (T, V)
        start, length = len(prompts[row]), len(answers[row])
        expected = logits[start - 1 : start - 1 + length]
        assert (expected - result.logits_full[row, :length]).abs().max().item() <= 1e-5
        assert (expected - result.logits_drop[row, :length]).abs().max().item() <= 1e-5


def test_ratio_one_ignores_pixels(vlm):
    first, _, _ = make_batch(vlm, [random_image(3)], QUESTIONS[:1], ANSWERS[:1])
    second, _, _ = make_batch(vlm, [random_image(4)], QUESTIONS[:1], ANSWERS[:1])
    drop_a = contrast(vlm.adapter, vlm.model, first, seeds=[5], ratio=1.0)
    drop_b = contrast(vlm.adapter, vlm.model, second, seeds=[6], ratio=1.0)
    assert (drop_a.logits_drop - drop_b.logits_drop).abs().max().item() <= 1e-5
    # The full pass must still see the pixels, or the check above proves nothing.
    assert (drop_a.logits_full - drop_b.logits_full).abs().max().item() > 1e-4


def test_remove_mode_shortens_by_floor(vlm):
    batch, _, _ = make_batch(vlm, [random_image(0), random_image(1)], QUESTIONS, ANSWERS)
    n_image = int(batch.image_token_mask[0].sum())
    dropped = draw_dropped_positions(batch.image_token_mask, 0.7, [1, 2])
    cut = apply_dropout(batch, dropped, "remove")
    expected = math.floor(0.7 * n_image)
    assert n_image == 64
    assert (batch.attention_mask.sum(1) - cut.attention_mask.sum(1)).tolist() == [expected, expected]
    assert cut.image_token_mask.sum(1).tolist() == [n_image - expected] * 2
    # Answers keep their tokens at the shifted positions.
    for row in range(2):
        length = int(batch.answer_mask[row].sum())
        before = batch.inputs_embeds[row, batch.answer_positions[row, :length]]
        after = cut.inputs_embeds[row, cut.answer_positions[row, :length]]
        assert torch.equal(before, after)
    assert cut.position_ids[0, : int(cut.attention_mask[0].sum())].tolist() == list(
        range(int(cut.attention_mask[0].sum()))
    )


def test_zero_mode_keeps_length(vlm):
    batch, _, _ = make_batch(vlm, [random_image(0)], QUESTIONS[:1], ANSWERS[:1])
    dropped = draw_dropped_positions(batch.image_token_mask, 0.7, [1])
    zeroed = apply_dropout(batch, dropped, "zero")
    assert zeroed.inputs_embeds.shape == batch.inputs_embeds.shape
    assert zeroed.inputs_embeds[dropped].abs().sum().item() == 0.0
    assert torch.equal(zeroed.inputs_embeds[~dropped], batch.inputs_embeds[~dropped])


def test_same_seed_same_positions():
    mask = torch.zeros((1, 100), dtype=torch.bool)
    mask[0, 10:74] = True
    first = draw_dropped_positions(mask, 0.7, [sample_seed("s1", 0)])
    again = draw_dropped_positions(mask, 0.7, [sample_seed("s1", 0)])
    other_seed = draw_dropped_positions(mask, 0.7, [sample_seed("s1", 1)])
    other_sample = draw_dropped_positions(mask, 0.7, [sample_seed("s2", 0)])
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)
    assert not torch.equal(first, other_sample)
    assert int(first.sum()) == 44
    assert not bool((first & ~mask).any())


def test_num_dropped_floor():
    assert num_dropped(576, 0.7) == 403
    assert num_dropped(10, 0.7) == 7
    assert num_dropped(16, 0.7) == 11
    assert num_dropped(5, 0.0) == 0
    assert num_dropped(5, 1.0) == 5


def test_p_diff_hand_computed():
    full = torch.tensor([2.0, 1.0, 0.0])
    drop = torch.tensor([1.0, 1.0, 1.0])
    beta = 0.5
    # (1 + beta) * full - beta * drop = [2.5, 1.0, -0.5]
    z = [2.5, 1.0, -0.5]
    total = sum(math.exp(v) for v in z)
    expected = torch.tensor([math.exp(v) / total for v in z])
    assert torch.allclose(p_diff(full, drop, beta), expected, atol=1e-7)
    # beta = 0 gives the plain softmax of the full logits.
    assert torch.allclose(p_diff(full, drop, 0.0), torch.softmax(full, -1), atol=1e-7)


def test_coupling_scores_are_logp_difference(vlm):
    batch, _, answers = make_batch(vlm, [random_image(0), random_image(1)], QUESTIONS, ANSWERS)
    result = contrast(vlm.adapter, vlm.model, batch, seeds=[1, 2], ratio=0.7)
    for row in range(2):
        length = len(answers[row])
        full = torch.log_softmax(result.logits_full[row, :length], -1)
        drop = torch.log_softmax(result.logits_drop[row, :length], -1)
        ids = torch.tensor(answers[row])
        expected = full[torch.arange(length), ids] - drop[torch.arange(length), ids]
        assert torch.allclose(result.coupling_scores[row, :length], expected, atol=1e-5)
        assert result.coupling_scores[row, length:].abs().sum().item() == 0.0
