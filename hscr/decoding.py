"""Batched greedy decoding for LLaVA-family models through the family adapter.

Each distinct image goes through the vision tower and projector once per batch, and its features
are scattered into the prompt embeddings. The batch is left-padded so that every row's next token
sits in the last column, and decoding reuses the language model's key/value cache.

    from hscr.decoding import greedy_generate
    answers = greedy_generate(vlm, [image], ["is there a lesion?"], max_new_tokens=16)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from hscr.images import open_stored
from hscr.models.base import VLM, unwrap_model
from hscr.sequences import build_batch, encode_images, positions_from_mask

logger = logging.getLogger(__name__)


def greedy_generate(
    vlm: VLM,
    images: Sequence[Any],
    questions: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Answer each question about its image with greedy decoding; returns the decoded answers.

    ``images`` contains PIL images or paths. A path, or the same PIL object, that occurs several
    times in a batch is encoded once. ``on_batch(n)`` is called after each batch of ``n`` rows.
    """
    token_lists = greedy_generate_ids(vlm, images, questions, max_new_tokens, batch_size, on_batch)
    return [vlm.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_lists]


def greedy_generate_ids(
    vlm: VLM,
    images: Sequence[Any],
    questions: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Return the generated token ids of each row, up to and including the first EOS."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    outputs: list[list[int]] = []
    for start in range(0, len(questions), batch_size):
        stop = min(start + batch_size, len(questions))
        outputs.extend(_generate_batch(vlm, images[start:stop], questions[start:stop], max_new_tokens))
        if on_batch is not None:
            on_batch(stop - start)
    return outputs


def eos_token_ids(vlm: VLM) -> set[int]:
    """Return the token ids that end an answer: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    if vlm.tokenizer.eos_token_id is not None:
        ids.add(int(vlm.tokenizer.eos_token_id))
    config = getattr(unwrap_model(vlm.model), "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return ids


def _unique_images(images: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """Return the distinct images (paths opened) and, per row, the index of its image."""
    unique: list[Any] = []
    index_of: dict[Any, int] = {}
    rows: list[int] = []
    for image in images:
        key = ("path", str(image)) if isinstance(image, (str, Path)) else ("object", id(image))
        if key not in index_of:
            index_of[key] = len(unique)
            unique.append(open_stored(image) if isinstance(image, (str, Path)) else image)
        rows.append(index_of[key])
    return unique, rows


def left_align(tensor: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Move each row's first ``lengths[row]`` entries to the end of the row (right to left padding)."""
    total = tensor.shape[1]
    shift = total - lengths                                                    # (B,)
    columns = torch.arange(total, device=tensor.device)
    source = (columns.unsqueeze(0) - shift.unsqueeze(1)) % total               # (B, T)
    if tensor.dim() > 2:
        source = source.view(*source.shape, *([1] * (tensor.dim() - 2))).expand_as(tensor)
    return tensor.gather(1, source)


@torch.no_grad()
def _generate_batch(vlm: VLM, images: Sequence[Any], questions: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    adapter, model = vlm.adapter, vlm.model
    unique, image_rows = _unique_images(images)
    features = encode_images(adapter, model, unique)                            # (U, N, D)
    prompts = [adapter.prompt(question) for question in questions]
    prompt_ids = adapter.prompt_ids(prompts, features.shape[1])

    # build_batch right-pads; decoding wants every row's last prompt token in the last column.
    batch = build_batch(adapter, model, prompt_ids, [[] for _ in prompt_ids], features, image_rows)
    lengths = batch.attention_mask.sum(dim=1)                                   # (B,)
    inputs_embeds = left_align(batch.inputs_embeds, lengths)                    # (B, T, D)
    attention_mask = left_align(batch.attention_mask, lengths)                  # (B, T)
    extras = {name: left_align(value, lengths) for name, value in batch.extras.items()}
    # Mistral derives positions from the cache length only, so padded rows need explicit ones.
    position_ids = positions_from_mask(attention_mask)                          # (B, T)

    embed = adapter.embed_tokens(model)
    head = adapter.lm_head(model)
    stop_ids = torch.tensor(sorted(eos_token_ids(vlm)), dtype=torch.long, device=inputs_embeds.device)
    batch_size = inputs_embeds.shape[0]
    finished = torch.zeros(batch_size, dtype=torch.bool, device=inputs_embeds.device)
    generated: list[torch.Tensor] = []

    # Prefill: the whole prompt once, keeping its keys and values.
    hidden, cache = adapter.language_forward_cached(model, inputs_embeds, attention_mask, position_ids, None, extras)
    for _ in range(max_new_tokens):
        logits = head(hidden[:, -1]).float()                                    # (B, V)
        next_ids = logits.argmax(dim=-1)                                        # (B,)
        generated.append(torch.where(finished, torch.full_like(next_ids, -1), next_ids))
        finished = finished | torch.isin(next_ids, stop_ids)
        if bool(finished.all()) or len(generated) == max_new_tokens:
            break

        # Decode step: one new token per row, attending to the cache and itself.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch_size, 1))], dim=1)
        position_ids = position_ids[:, -1:] + 1                                 # (B, 1)
        step_embeds = embed(next_ids.unsqueeze(1))                              # (B, 1, D)
        hidden, cache = adapter.language_forward_cached(model, step_embeds, attention_mask, position_ids, cache)

    tokens = torch.stack(generated, dim=1).tolist()                             # (B, steps)
    return [[t for t in row if t >= 0] for row in tokens]
