"""Summed log-probs of a sample's k+1 answers with the image + prompt prefix computed once.

MLPO scores a chosen answer and k rejected answers that all follow the same image and prompt. The
packed forward lays out one row per sample as ``prefix | answer_0 | answer_1 | ... | answer_k``
and runs the language model once with a block attention mask: prefix tokens attend causally to
the prefix, and each answer token attends to the whole prefix and causally to its own answer.
Every answer's position ids restart right after the prefix, so each answer is scored as if it
were the only continuation, and gradients flow through the shared prefix.

A prefix key/value cache expanded to the answers would do the same arithmetic, but Hugging Face
decoder layers drop the cache under gradient checkpointing (with only a warning, transformers
5.25), so that route silently breaks in training; the packed route does not depend on a cache.

:func:`repeated_logps` is the plain route, one sequence per answer with the prefix repeated; it
gives the same values and serves as the baseline in tests and ``benchmarks/bench_train.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from hscr.errors import HSCRError
from hscr.models.base import FamilyAdapter, unwrap_model
from hscr.sequences import build_batch, fit_prompts, sequence_logps, token_logps


@dataclass
class PackedBatch:
    """One row per sample: the shared prefix followed by all of its answers."""

    inputs_embeds: torch.Tensor        # (B, T, D)
    attention_mask: torch.Tensor       # (B, 1, T, T) bool (True: may attend) or additive float
    position_ids: torch.Tensor         # (B, T)
    predict_positions: torch.Tensor    # (B, R, A) index in T of the hidden state predicting each answer token
    answer_ids: torch.Tensor           # (B, R, A), 0 at padding
    answer_mask: torch.Tensor          # (B, R, A) bool
    extras: dict[str, torch.Tensor]

    @property
    def response_mask(self) -> torch.Tensor:
        """Answers that exist (a sample may have fewer than R): ``(B, R)`` bool."""
        return self.answer_mask.any(dim=-1)


def _attention_implementation(model: Any) -> str:
    config = unwrap_model(model).config
    text_config = getattr(config, "text_config", None) or config
    return str(getattr(text_config, "_attn_implementation", None) or "sdpa")


def block_attention_mask(segments: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Block-causal mask from per-token segment ids: 0 prefix, i + 1 answer i, -1 padding.

    Returns ``(B, 1, T, T)``: bool for SDPA and flex attention, additive float for eager.
    """
    seq_len = segments.shape[1]
    index = torch.arange(seq_len, device=segments.device)
    causal = index.unsqueeze(1) >= index.unsqueeze(0)                        # (T, T) query >= key
    query = segments.unsqueeze(2)                                            # (B, T, 1)
    key = segments.unsqueeze(1)                                              # (B, 1, T)
    same_block = (key == 0) | (key == query)                                 # prefix or own answer
    allowed = causal & same_block & (query >= 0) & (key >= 0)                # (B, T, T)
    # Padding queries attend to themselves only, so no softmax row is empty (which gives NaN in SDPA).
    allowed = allowed | (torch.eye(seq_len, dtype=torch.bool, device=segments.device) & (query < 0))
    allowed = allowed.unsqueeze(1)                                           # (B, 1, T, T)
    if implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=segments.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    if implementation.startswith("flash"):
        raise HSCRError(
            f"the packed MLPO forward needs a block attention mask, which attn_implementation={implementation!r} "
            "does not take; load the model with attn_implementation='sdpa' or 'eager', or set shared_prefix=false"
        )
    return allowed


def build_packed_batch(
    adapter: FamilyAdapter,
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    responses: Sequence[Sequence[Sequence[int]]],   # per sample: chosen, then rejected answers
    image_features: torch.Tensor,                   # (U, N, D)
    image_rows: Sequence[int],
) -> PackedBatch:
    """Embed ``prefix | answers...`` rows and build the block mask and per-answer positions."""
    # Families whose image token count varies (LLaVA-NeXT) need each prefix fitted to its image first.
    prompt_ids = fit_prompts(adapter, prompt_ids, image_features, image_rows)
    num_responses = max(len(r) for r in responses)
    max_answer = max(len(a) for r in responses for a in r)
    concatenated = [[token for answer in answers for token in answer] for answers in responses]
    # build_batch embeds the ids and scatters the image features into the placeholders.
    flat = build_batch(adapter, model, prompt_ids, concatenated, image_features, image_rows)
    if flat.extras:
        raise NotImplementedError(
            f"packed MLPO forward for a family with per-token extras ({', '.join(flat.extras)}); "
            "set shared_prefix=false to use one sequence per answer"
        )
    batch_size, seq_len = flat.attention_mask.shape

    segments = torch.full((batch_size, seq_len), -1, dtype=torch.long)
    position_ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
    predict = torch.zeros((batch_size, num_responses, max_answer), dtype=torch.long)
    answer_ids = torch.zeros((batch_size, num_responses, max_answer), dtype=torch.long)
    answer_mask = torch.zeros((batch_size, num_responses, max_answer), dtype=torch.bool)
    for row, (prompt, answers) in enumerate(zip(prompt_ids, responses)):
        prefix_len = len(prompt)
        segments[row, :prefix_len] = 0
        position_ids[row, :prefix_len] = torch.arange(prefix_len)
        start = prefix_len
        for slot, answer in enumerate(answers):
            length = len(answer)
            if length == 0:
                continue
            segments[row, start : start + length] = slot + 1
            position_ids[row, start : start + length] = torch.arange(prefix_len, prefix_len + length)
            # The first answer token is predicted by the last prefix token, the rest by their predecessor.
            predict[row, slot, 0] = prefix_len - 1
            predict[row, slot, 1:length] = torch.arange(start, start + length - 1)
            answer_ids[row, slot, :length] = torch.tensor(list(answer), dtype=torch.long)
            answer_mask[row, slot, :length] = True
            start += length

    device = flat.inputs_embeds.device
    segments = segments.to(device)
    mask = block_attention_mask(segments, _attention_implementation(model), flat.inputs_embeds.dtype)
    return PackedBatch(
        inputs_embeds=flat.inputs_embeds,
        attention_mask=mask,
        position_ids=position_ids.to(device),
        predict_positions=predict.to(device),
        answer_ids=answer_ids.to(device),
        answer_mask=answer_mask.to(device),
        extras={},
    )


def packed_logps(adapter: FamilyAdapter, model: Any, batch: PackedBatch) -> torch.Tensor:
    """Summed log-prob of every answer of every sample in one forward: ``(B, R)``, 0 for missing answers."""
    hidden = adapter.language_forward(
        model, batch.inputs_embeds, batch.attention_mask, batch.position_ids, batch.extras
    )                                                                        # (B, T, D)
    batch_size, num_responses, max_answer = batch.predict_positions.shape
    index = batch.predict_positions.reshape(batch_size, -1, 1).expand(-1, -1, hidden.shape[-1])  # (B, R*A, D)
    answer_hidden = hidden.gather(1, index)                                  # (B, R*A, D)
    logits = adapter.lm_head(model)(answer_hidden).float()                   # (B, R*A, V)
    logps = token_logps(
        logits, batch.answer_ids.reshape(batch_size, -1), batch.answer_mask.reshape(batch_size, -1)
    )                                                                        # (B, R*A)
    return logps.reshape(batch_size, num_responses, max_answer).sum(dim=-1)  # (B, R)


def repeated_logps(
    adapter: FamilyAdapter,
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    responses: Sequence[Sequence[Sequence[int]]],
    image_features: torch.Tensor,
    image_rows: Sequence[int],
) -> torch.Tensor:
    """Compute the same ``(B, R)`` log-probs with one sequence per answer, each repeating the prefix."""
    num_responses = max(len(r) for r in responses)
    rows, prompts, answers, features_rows = [], [], [], []
    for sample, (prompt, sample_answers) in enumerate(zip(prompt_ids, responses)):
        for slot, answer in enumerate(sample_answers):
            if len(answer) == 0:
                continue
            rows.append(sample * num_responses + slot)
            prompts.append(prompt)
            answers.append(answer)
            features_rows.append(image_rows[sample])
    batch = build_batch(adapter, model, prompts, answers, image_features, features_rows)
    values = sequence_logps(adapter, model, batch)                           # (rows,)
    out = values.new_zeros(len(prompt_ids) * num_responses)
    out = out.index_put((torch.as_tensor(rows, device=values.device),), values)
    return out.reshape(len(prompt_ids), num_responses)                       # (B, R)
