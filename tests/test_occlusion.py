"""Patch occlusion: batched scores equal one-by-one forwards, windows tile the grid."""

import pytest
import torch

from hscr.contrast import apply_dropout
from hscr.occlusion import grid_side, occlusion_map, occlusion_scores, occlusion_windows, single_sequence
from hscr.sequences import answer_logits
from support import random_image, tiny_vlm


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return tiny_vlm(image_size=32, patch_size=8)  # 16 image tokens


def unbatched_drop(vlm, batch, positions, mode):
    """Log-prob drop of each answer token with ``positions`` occluded, one sequence at a time."""
    image_positions = batch.image_token_mask[0].nonzero().squeeze(-1)
    dropped = torch.zeros_like(batch.image_token_mask)
    dropped[0, image_positions[positions]] = True
    occluded = apply_dropout(batch, dropped, mode)
    answer = batch.answer_ids[0, batch.answer_mask[0]]

    def logps(b):
        logits = answer_logits(vlm.adapter, vlm.model, b)[0, : answer.numel()]
        return torch.log_softmax(logits, dim=-1).gather(-1, answer.unsqueeze(-1)).squeeze(-1)

    return logps(batch) - logps(occluded)


def test_windows_tile_grid_exactly():
    assert occlusion_windows(16, 1) == [[i] for i in range(16)]
    assert occlusion_windows(16, 3) == [[0, 1, 2, 4, 5, 6, 8, 9, 10], [3, 7, 11], [12, 13, 14], [15]]
    covered = sorted(i for block in occlusion_windows(36, 4) for i in block)
    assert covered == list(range(36))


def test_grid_side_rejects_non_square():
    assert grid_side(576) == 24
    with pytest.raises(ValueError, match="15 image tokens"):
        grid_side(15)
    with pytest.raises(ValueError, match="window=0"):
        occlusion_windows(16, 0)


@pytest.mark.parametrize("mode", ["remove", "zero"])
def test_batched_scores_match_single_forwards(vlm, mode):
    batch = single_sequence(vlm, random_image(1, 32), "is there a lesion in the left lung ?", "yes the left lung")
    scores = occlusion_scores(vlm.adapter, vlm.model, batch, mode=mode, chunk_size=5)
    num_answer = int(batch.answer_mask[0].sum())
    assert scores.shape == (num_answer, 16)
    for patch in (0, 7, 15):
        expected = unbatched_drop(vlm, batch, [patch], mode)
        torch.testing.assert_close(scores[:, patch], expected, atol=1e-5, rtol=1e-4)
    assert scores.abs().max() > 0


def test_window_block_shares_one_score(vlm):
    batch = single_sequence(vlm, random_image(2, 32), "what modality is this image ?", "ct")
    scores = occlusion_scores(vlm.adapter, vlm.model, batch, window=2, chunk_size=3)
    block = [0, 1, 4, 5]
    expected = unbatched_drop(vlm, batch, block, "remove")
    for patch in block:
        torch.testing.assert_close(scores[:, patch], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores[:, 10], scores[:, 15])  # block [10, 11, 14, 15]


def test_occlusion_map_grid_per_token(vlm):
    result = occlusion_map(vlm, random_image(3, 32), "how many lesions are visible ?", "two lesions")
    assert result.side == 4
    assert len(result.tokens) == result.scores.shape[0]
    assert result.tokens[-1] == vlm.tokenizer.eos_token
    assert result.grid(0).shape == (4, 4)
    assert (result.grid(1).ravel() == result.scores[1]).all()
    with pytest.raises(IndexError, match="out of range"):
        result.grid(len(result.tokens))


def test_rejects_batch_of_two(vlm):
    batch = single_sequence(vlm, random_image(4, 32), "is the heart enlarged ?", "no")
    with pytest.raises(ValueError, match="one sequence"):
        occlusion_scores(vlm.adapter, vlm.model, batch.select([0, 0]))
