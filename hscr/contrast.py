"""Visual token dropout and the full-versus-dropped contrast (method steps 2-5).

A seeded share of the image positions is removed (or zeroed), the reference answer is teacher-
forced on the full and the dropped sequences in one batched call, and the difference of the
answer tokens' log-probs is the coupling score: how much the image raises each token.

    s_t      = log p_full(y_t) - log p_drop(y_t)
    P_diff_t = softmax((1 + beta) * L_full[t] - beta * L_drop[t])
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from hscr.models.base import FamilyAdapter
from hscr.sequences import (
    SequenceBatch,
    answer_logits,
    concat_batches,
    positions_from_mask,
    token_logps,
)


def sample_seed(sample_id: str, seed: int) -> int:
    """Mix the config seed with the sample id, so each sample gets its own reproducible draw."""
    digest = hashlib.sha256(f"{seed}\x1f{sample_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def num_dropped(num_image_tokens: int, ratio: float) -> int:
    # A tiny epsilon keeps 0.7 * 10 at 7 despite 0.7 being stored as 0.6999...
    return min(num_image_tokens, int(math.floor(ratio * num_image_tokens + 1e-9)))


def draw_dropped_positions(image_token_mask: torch.Tensor, ratio: float, seeds: Sequence[int]) -> torch.Tensor:
    """Choose ``floor(ratio * N)`` image positions per row with a per-row generator.

    Returns a bool mask ``(B, T)`` that is True at the dropped positions.
    """
    dropped = torch.zeros_like(image_token_mask, dtype=torch.bool)
    for row, seed in enumerate(seeds):
        positions = image_token_mask[row].nonzero().squeeze(-1)             # (N,)
        count = num_dropped(positions.numel(), ratio)
        if count == 0:
            continue
        generator = torch.Generator().manual_seed(int(seed))
        chosen = torch.randperm(positions.numel(), generator=generator)[:count]
        dropped[row, positions[chosen.to(positions.device)]] = True
    return dropped


def apply_dropout(batch: SequenceBatch, dropped: torch.Tensor, mode: str = "remove") -> SequenceBatch:
    """Return ``batch`` with the dropped image positions removed or zeroed.

    ``remove`` deletes the positions from every per-token tensor and recomputes position ids as
    if the removed tokens had never been there; ``zero`` keeps the sequence and zeroes the
    embeddings (an ablation: the model still sees that there were image tokens).
    """
    if mode == "zero":
        embeds = batch.inputs_embeds.masked_fill(dropped.unsqueeze(-1), 0.0)
        return replace(batch, inputs_embeds=embeds)
    if mode != "remove":
        raise ValueError(f"invalid dropout mode {mode!r}: expected 'remove' or 'zero'")

    keep = ~dropped                                                          # (B, T)
    new_lengths = keep.sum(dim=1)
    new_len = int(new_lengths.max())
    # Stable order of kept positions per row: sort by (dropped, original index).
    device = keep.device
    seq_len = keep.shape[1]
    order_key = (~keep).long() * seq_len + torch.arange(seq_len, device=device)
    gather_index = order_key.argsort(dim=1)[:, :new_len]                    # (B, T')

    def cut(t: torch.Tensor) -> torch.Tensor:
        index = gather_index
        for _ in range(t.dim() - 2):
            index = index.unsqueeze(-1)
        index = index.expand(-1, -1, *t.shape[2:])
        return t.gather(1, index)

    attention_mask = cut(batch.attention_mask)
    # Slots past a row's new length were filled from dropped positions: mark them as padding.
    valid = torch.arange(new_len, device=device).unsqueeze(0) < new_lengths.unsqueeze(1)
    attention_mask = attention_mask * valid
    shift = (~keep).long().cumsum(dim=1)                                     # dropped positions up to t
    answer_positions = batch.answer_positions - shift.gather(1, batch.answer_positions)
    return SequenceBatch(
        inputs_embeds=cut(batch.inputs_embeds),
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        image_token_mask=cut(batch.image_token_mask) & valid,
        answer_positions=answer_positions,
        answer_ids=batch.answer_ids,
        answer_mask=batch.answer_mask,
        extras={k: cut(v) for k, v in batch.extras.items()},
    )


def p_diff(logits_full: torch.Tensor, logits_drop: torch.Tensor, beta: float) -> torch.Tensor:
    """Contrastive distribution ``softmax((1 + beta) * L_full - beta * L_drop)`` over the vocabulary."""
    return torch.softmax((1.0 + beta) * logits_full - beta * logits_drop, dim=-1)


@dataclass
class ContrastResult:
    """Teacher-forced answer logits with and without most of the image."""

    logits_full: torch.Tensor      # (B, A, V) float32
    logits_drop: torch.Tensor      # (B, A, V) float32
    logp_full: torch.Tensor        # (B, A) log p_full(y_t), 0 at padding
    logp_drop: torch.Tensor        # (B, A)
    answer_ids: torch.Tensor       # (B, A)
    answer_mask: torch.Tensor      # (B, A) bool
    dropped: torch.Tensor          # (B, T) bool, dropped image positions

    @property
    def coupling_scores(self) -> torch.Tensor:
        """``s_t = log p_full(y_t) - log p_drop(y_t)``, 0 at padding: ``(B, A)``."""
        return (self.logp_full - self.logp_drop) * self.answer_mask


@torch.no_grad()
def contrast(
    adapter: FamilyAdapter,
    model: Any,
    batch: SequenceBatch,
    seeds: Sequence[int],
    ratio: float = 0.7,
    mode: str = "remove",
) -> ContrastResult:
    """Teacher-force the answers on the full and the dropped sequences in one forward call."""
    dropped = draw_dropped_positions(batch.image_token_mask, ratio, seeds)
    dropped_batch = apply_dropout(batch, dropped, mode)
    both = concat_batches([batch, dropped_batch])                          # (2B, T, D)
    logits = answer_logits(adapter, model, both)                           # (2B, A, V)
    size = batch.batch_size
    logits_full, logits_drop = logits[:size], logits[size:]
    return ContrastResult(
        logits_full=logits_full,
        logits_drop=logits_drop,
        logp_full=token_logps(logits_full, batch.answer_ids, batch.answer_mask),
        logp_drop=token_logps(logits_drop, batch.answer_ids, batch.answer_mask),
        answer_ids=batch.answer_ids,
        answer_mask=batch.answer_mask,
        dropped=dropped,
    )
