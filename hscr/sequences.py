"""Prompt + answer sequences built from cached image features, and teacher-forced log-probs.

Every pass of the method runs the language model on embeddings: the vision tower and projector
run once per image (:func:`encode_images`), and their features are scattered into the
placeholder positions of as many sequences as need them (the full pass, the dropped pass, each
candidate answer for the reference log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from hscr.models.base import FamilyAdapter


@dataclass
class SequenceBatch:
    """Right-padded sequences ready for the language model."""

    inputs_embeds: torch.Tensor        # (B, T, D)
    attention_mask: torch.Tensor       # (B, T) long
    position_ids: torch.Tensor         # (B, T) long
    image_token_mask: torch.Tensor     # (B, T) bool
    answer_positions: torch.Tensor     # (B, A) long, index in T of each answer token
    answer_ids: torch.Tensor           # (B, A) long, 0 where answer_mask is False
    answer_mask: torch.Tensor          # (B, A) bool
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # family-specific (B, T, ...) tensors

    @property
    def batch_size(self) -> int:
        return self.inputs_embeds.shape[0]

    def select(self, rows: torch.Tensor | list[int]) -> "SequenceBatch":
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.inputs_embeds.device)
        return SequenceBatch(
            inputs_embeds=self.inputs_embeds[rows],
            attention_mask=self.attention_mask[rows],
            position_ids=self.position_ids[rows],
            image_token_mask=self.image_token_mask[rows],
            answer_positions=self.answer_positions[rows],
            answer_ids=self.answer_ids[rows],
            answer_mask=self.answer_mask[rows],
            extras={k: v[rows] for k, v in self.extras.items()},
        )


def encode_images(adapter: FamilyAdapter, model: Any, images: Sequence[Any]) -> torch.Tensor:
    """Run the vision tower and projector once per image: ``(num_images, N, D)``."""
    pixel_inputs = adapter.pixel_values(images)
    return adapter.image_features(model, pixel_inputs)


def build_batch(
    adapter: FamilyAdapter,
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    image_features: torch.Tensor,          # (U, N, D)
    image_rows: Sequence[int],             # row -> index into image_features
) -> SequenceBatch:
    """Concatenate prompt and answer ids, embed them and scatter the image features in."""
    counts = adapter.image_token_counts(image_features)                     # tokens per image
    prompt_ids = fit_prompts(adapter, prompt_ids, image_features, image_rows)
    embed = adapter.embed_tokens(model)
    device = embed.weight.device
    pad_id = adapter.tokenizer.pad_token_id or 0
    lengths = [len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)]
    max_len = max(lengths)
    max_answer = max(len(a) for a in answer_ids)
    batch_size = len(prompt_ids)

    ids = torch.full((batch_size, max_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, max_len), dtype=torch.long)
    answer_positions = torch.zeros((batch_size, max_answer), dtype=torch.long)
    answer_tensor = torch.zeros((batch_size, max_answer), dtype=torch.long)
    answer_mask = torch.zeros((batch_size, max_answer), dtype=torch.bool)
    for row, (prompt, answer) in enumerate(zip(prompt_ids, answer_ids)):
        seq = list(prompt) + list(answer)
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        answer_positions[row, : len(answer)] = torch.arange(len(prompt), len(seq))
        answer_tensor[row, : len(answer)] = torch.tensor(list(answer), dtype=torch.long)
        answer_mask[row, : len(answer)] = True

    ids = ids.to(device)
    image_token_mask = ids == adapter.image_token_id                       # (B, T)
    inputs_embeds = embed(ids)                                              # (B, T, D)
    per_row = image_token_mask.sum(dim=1)
    if adapter.variable_image_tokens:
        expected = torch.as_tensor([counts[i] for i in image_rows], device=per_row.device)
        # Padded feature rows past each image's count are left out.
        flat_features = torch.cat([image_features[i, : counts[i]] for i in image_rows])   # (sum counts, D)
    else:
        features = image_features[torch.as_tensor(list(image_rows), device=image_features.device)]  # (B, N, D)
        expected = torch.full_like(per_row, features.shape[1])
        flat_features = features.reshape(-1, features.shape[-1])
    if bool((per_row != expected).any()):
        raise ValueError(
            f"image features and image tokens do not match: {expected.tolist()} features per row, "
            f"{per_row.tolist()} placeholder tokens per row"
        )
    inputs_embeds = inputs_embeds.masked_scatter(
        image_token_mask.unsqueeze(-1), flat_features.to(inputs_embeds.dtype)
    )
    attention_mask = attention_mask.to(device)
    extras = adapter.sequence_extras(ids, attention_mask, image_token_mask, image_features, list(image_rows))
    return SequenceBatch(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        image_token_mask=image_token_mask,
        answer_positions=answer_positions.to(device),
        answer_ids=answer_tensor.to(device),
        answer_mask=answer_mask.to(device),
        extras=extras,
    )


def fit_prompts(
    adapter: FamilyAdapter,
    prompt_ids: Sequence[Sequence[int]],
    image_features: torch.Tensor,          # (U, N, D)
    image_rows: Sequence[int],
) -> Sequence[Sequence[int]]:
    """Return ``prompt_ids`` with each placeholder run fitted to its image, for variable-count families.

    Fixed-count families get ``prompt_ids`` back unchanged. Code that derives positions from
    prompt lengths must use the fitted prompts, as ``build_batch`` does.
    """
    if not adapter.variable_image_tokens:
        return prompt_ids
    counts = adapter.image_token_counts(image_features)
    return fit_image_tokens(adapter.image_token_id, prompt_ids, [counts[i] for i in image_rows])


def fit_image_tokens(
    image_token_id: int, prompt_ids: Sequence[Sequence[int]], counts: Sequence[int]
) -> list[list[int]]:
    """Resize each prompt's single run of image placeholders to ``counts[row]`` tokens."""
    fitted = []
    for row, (prompt, count) in enumerate(zip(prompt_ids, counts)):
        prompt = list(prompt)
        positions = [i for i, token in enumerate(prompt) if token == image_token_id]
        if not positions:
            raise ValueError(f"prompt row {row} has no image placeholder token {image_token_id}")
        first, last = positions[0], positions[-1]
        if last - first + 1 != len(positions):
            raise ValueError(f"prompt row {row} has more than one run of image placeholders; one image per prompt is supported")
        fitted.append(prompt[:first] + [image_token_id] * count + prompt[last + 1 :])
    return fitted


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting only attended tokens, as if padding and removed tokens were absent."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def pad_to_length(batch: SequenceBatch, length: int) -> SequenceBatch:
    """Right-pad every per-token tensor of ``batch`` to ``length``."""
    extra = length - batch.inputs_embeds.shape[1]
    if extra <= 0:
        return batch

    def pad(t: torch.Tensor, value: float | bool | int = 0) -> torch.Tensor:
        shape = list(t.shape)
        shape[1] = extra
        return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], dim=1)

    return replace(
        batch,
        inputs_embeds=pad(batch.inputs_embeds),
        attention_mask=pad(batch.attention_mask),
        position_ids=pad(batch.position_ids),
        image_token_mask=pad(batch.image_token_mask, False),
        extras={k: pad(v) for k, v in batch.extras.items()},
    )


def concat_batches(batches: Sequence[SequenceBatch]) -> SequenceBatch:
    """Stack batches along rows, padding tokens and answers to common lengths."""
    length = max(b.inputs_embeds.shape[1] for b in batches)
    answer_len = max(b.answer_ids.shape[1] for b in batches)
    padded = [pad_to_length(b, length) for b in batches]

    def pad_answer(t: torch.Tensor, value: int | bool) -> torch.Tensor:
        extra = answer_len - t.shape[1]
        if extra == 0:
            return t
        return torch.cat([t, torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)], dim=1)

    return SequenceBatch(
        inputs_embeds=torch.cat([b.inputs_embeds for b in padded]),
        attention_mask=torch.cat([b.attention_mask for b in padded]),
        position_ids=torch.cat([b.position_ids for b in padded]),
        image_token_mask=torch.cat([b.image_token_mask for b in padded]),
        answer_positions=torch.cat([pad_answer(b.answer_positions, 0) for b in padded]),
        answer_ids=torch.cat([pad_answer(b.answer_ids, 0) for b in padded]),
        answer_mask=torch.cat([pad_answer(b.answer_mask, False) for b in padded]),
        extras={k: torch.cat([b.extras[k] for b in padded]) for k in padded[0].extras},
    )


def answer_logits(adapter: FamilyAdapter, model: Any, batch: SequenceBatch) -> torch.Tensor:
    """Teacher-forced logits that predict each answer token: ``(B, A, V)``, float32.

    Only the answer positions go through the LM head, which is most of the vocabulary cost.
    """
    hidden = adapter.language_forward(
        model, batch.inputs_embeds, batch.attention_mask, batch.position_ids, batch.extras
    )                                                                       # (B, T, D)
    # The logit at position p predicts the token at p + 1.
    predict_at = (batch.answer_positions - 1).clamp(min=0)                 # (B, A)
    index = predict_at.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])     # (B, A, D)
    answer_hidden = hidden.gather(1, index)                                 # (B, A, D)
    return adapter.lm_head(model)(answer_hidden).float()                   # (B, A, V)


def token_logps(logits: torch.Tensor, answer_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Log-prob of each answer token, 0 at padding: ``(B, A)``."""
    logp = torch.log_softmax(logits, dim=-1)                               # (B, A, V)
    picked = logp.gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1)          # (B, A)
    return picked * answer_mask


def sequence_logps(adapter: FamilyAdapter, model: Any, batch: SequenceBatch) -> torch.Tensor:
    """Summed log-prob of every row's answer: ``(B,)``."""
    logits = answer_logits(adapter, model, batch)
    return token_logps(logits, batch.answer_ids, batch.answer_mask).sum(dim=-1)
