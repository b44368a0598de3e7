"""Patch occlusion: which image patches each answer token depends on.

Each image token (one per vision patch) is occluded in turn, alone or as a square window of
neighbouring patches, and the reference answer is teacher-forced again. The drop of an answer
token's log-prob is that patch's importance for the token:

    importance[t, k] = log p(y_t | full image) - log p(y_t | image without patch k)

All occluded copies of the sequence run in batches of ``chunk_size`` rows, so a 16-token demo
image needs one forward call and LLaVA-Med's 576 tokens need 576 / chunk_size calls (fewer with
``window`` > 1).

    from hscr.occlusion import occlusion_map
    result = occlusion_map(vlm, image, "is there a lesion?", "yes")
    result.grid(0)          # (side, side) importance of each patch for the first answer token
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hscr.contrast import apply_dropout
from hscr.models.base import VLM, FamilyAdapter
from hscr.sequences import SequenceBatch, answer_logits, build_batch, encode_images, token_logps


def grid_side(num_image_tokens: int) -> int:
    """Return the side of the square patch grid; raises ValueError when N is not a square."""
    side = math.isqrt(num_image_tokens)
    if side * side != num_image_tokens:
        raise ValueError(f"{num_image_tokens} image tokens do not form a square patch grid")
    return side


def occlusion_windows(num_image_tokens: int, window: int = 1) -> list[list[int]]:
    """Split the patch grid into ``window`` x ``window`` blocks; returns token indices per block.

    Blocks at the right and bottom edges are smaller when the side is not a multiple of
    ``window``. Token indices run row by row, as CLIP emits its patches.
    """
    if window < 1:
        raise ValueError(f"invalid window={window}: expected an integer >= 1")
    side = grid_side(num_image_tokens)
    blocks = []
    for top in range(0, side, window):
        for left in range(0, side, window):
            rows = range(top, min(top + window, side))
            cols = range(left, min(left + window, side))
            blocks.append([r * side + c for r in rows for c in cols])
    return blocks


@torch.no_grad()
def occlusion_scores(
    adapter: FamilyAdapter,
    model: Any,
    batch: SequenceBatch,
    mode: str = "remove",
    window: int = 1,
    chunk_size: int = 32,
) -> torch.Tensor:
    """Log-prob drop of every answer token when each patch block is occluded: ``(A, N)``.

    ``batch`` holds one sequence. ``mode`` is ``remove`` (the patch's positions leave the
    sequence, as in the visual token dropout) or ``zero`` (its embeddings are zeroed). Every
    token of a block gets the block's score. Padding answer positions are not returned.
    """
    if batch.batch_size != 1:
        raise ValueError(f"occlusion_scores takes one sequence, got a batch of {batch.batch_size}")
    if chunk_size < 1:
        raise ValueError(f"invalid chunk_size={chunk_size}: expected an integer >= 1")
    num_answer = int(batch.answer_mask[0].sum())
    image_positions = batch.image_token_mask[0].nonzero().squeeze(-1)         # (N,)
    num_image = image_positions.numel()
    blocks = occlusion_windows(num_image, window)

    full_logps = token_logps(answer_logits(adapter, model, batch), batch.answer_ids, batch.answer_mask)  # (1, A)

    block_drops = []
    for start in range(0, len(blocks), chunk_size):
        chunk = blocks[start : start + chunk_size]
        rows = batch.select([0] * len(chunk))
        dropped = torch.zeros_like(rows.image_token_mask, dtype=torch.bool)    # (C, T)
        for row, block in enumerate(chunk):
            dropped[row, image_positions[block]] = True
        occluded = apply_dropout(rows, dropped, mode)
        logps = token_logps(answer_logits(adapter, model, occluded), rows.answer_ids, rows.answer_mask)  # (C, A)
        block_drops.append(full_logps - logps)
    drops = torch.cat(block_drops)[:, :num_answer]                             # (blocks, A)

    scores = torch.zeros(num_answer, num_image, dtype=drops.dtype, device=drops.device)  # (A, N)
    for index, block in enumerate(blocks):
        scores[:, block] = drops[index].unsqueeze(-1)
    return scores


def single_sequence(vlm: VLM, image: Any, question: str, answer: str) -> SequenceBatch:
    """Build the teacher-forced sequence of one image, question and answer."""
    adapter = vlm.adapter
    features = encode_images(adapter, vlm.model, [image])                     # (1, N, D)
    prompt_ids = adapter.prompt_ids([adapter.prompt(question)], features.shape[1])
    answer_ids = [adapter.answer_ids(answer)]
    return build_batch(adapter, vlm.model, prompt_ids, answer_ids, features, [0])


@dataclass
class OcclusionMap:
    """Patch importance for every answer token of one sample."""

    scores: np.ndarray            # (A, N) log-prob drop in nats when the patch is occluded
    tokens: list[str]             # the A answer tokens, as the tokenizer spells them
    side: int                     # the patch grid is side x side

    def grid(self, token_index: int) -> np.ndarray:
        """Return the ``(side, side)`` importance map of one answer token."""
        if not 0 <= token_index < len(self.tokens):
            raise IndexError(f"token index {token_index} is out of range for {len(self.tokens)} answer tokens")
        return self.scores[token_index].reshape(self.side, self.side)


def occlusion_map(
    vlm: VLM,
    image: Any,
    question: str,
    answer: str,
    mode: str = "remove",
    window: int = 1,
    chunk_size: int = 32,
) -> OcclusionMap:
    """Occlude every patch of ``image`` in turn and measure each answer token's log-prob drop."""
    batch = single_sequence(vlm, image, question, answer)
    scores = occlusion_scores(vlm.adapter, vlm.model, batch, mode=mode, window=window, chunk_size=chunk_size)
    ids = batch.answer_ids[0, : scores.shape[0]].tolist()
    tokens = vlm.tokenizer.convert_ids_to_tokens(ids)
    side = grid_side(scores.shape[1])
    return OcclusionMap(scores=scores.float().cpu().numpy(), tokens=list(tokens), side=side)
