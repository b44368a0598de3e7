"""Graded dispreferred responses (method step 5 and 6).

The reference answer's most modality-coupled words are swapped, one more at a time, for tokens
that the image-less pass finds plausible but the image does not support:

    candidates(v) = p_drop(v) >= alpha * max p_drop,  v != y_t,  v not special
    replacement   = argmin over candidates of P_diff(v)

Replacement works on whole words. A word that the tokenizer splits into several pieces is one
unit: its score is the largest coupling score among its pieces, and the whole word is replaced by
one word-start token predicted at the word's first position. So a replacement never glues two
words together and never leaves half a word behind. Punctuation and special tokens are never
replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from hscr.contrast import p_diff

_VOCAB_CACHE: dict[int, "VocabInfo"] = {}


@dataclass
class VocabInfo:
    """Per-token facts about a tokenizer's vocabulary."""

    word_start: torch.Tensor      # (V,) bool: the token begins a new word
    wordlike: torch.Tensor        # (V,) bool: the token has a letter or digit
    special: torch.Tensor         # (V,) bool: special or added control token
    bare_marker: torch.Tensor     # (V,) bool: only a word-start marker (``▁``), the word follows

    @property
    def replaceable(self) -> torch.Tensor:
        """Tokens allowed as a whole-word replacement."""
        return self.word_start & self.wordlike & ~self.special


def vocab_info(tokenizer: Any, extra_special: Sequence[int] = ()) -> VocabInfo:
    """Classify the vocabulary once per tokenizer (Metaspace ``▁``, byte-level ``Ġ``, WordPiece ``##``, word-level)."""
    key = id(tokenizer)
    if key in _VOCAB_CACHE and not extra_special:
        return _VOCAB_CACHE[key]
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    tokens = [t if isinstance(t, str) else "" for t in tokens]
    has_metaspace = any(t.startswith("▁") for t in tokens)
    has_bytelevel = any(t.startswith("Ġ") for t in tokens)
    has_wordpiece = any(t.startswith("##") for t in tokens)

    word_start = torch.zeros(size, dtype=torch.bool)
    wordlike = torch.zeros(size, dtype=torch.bool)
    bare_marker = torch.zeros(size, dtype=torch.bool)
    for index, token in enumerate(tokens):
        if has_metaspace:
            starts, body = token.startswith("▁"), token.lstrip("▁")
        elif has_bytelevel:
            starts, body = token.startswith("Ġ"), token.lstrip("Ġ")
        elif has_wordpiece:
            starts, body = not token.startswith("##"), token[2:] if token.startswith("##") else token
        else:
            starts, body = True, token  # word-level: every token is a whole word
        word_start[index] = starts
        wordlike[index] = any(ch.isalnum() for ch in body)
        bare_marker[index] = starts and body == "" and token != ""

    special = torch.zeros(size, dtype=torch.bool)
    special_ids = set(tokenizer.all_special_ids) | set(extra_special)
    for added_id in getattr(tokenizer, "added_tokens_decoder", {}) or {}:
        special_ids.add(int(added_id))
    for token_id in special_ids:
        if 0 <= token_id < size:
            special[token_id] = True
    info = VocabInfo(word_start=word_start, wordlike=wordlike, special=special, bare_marker=bare_marker)
    if not extra_special:
        _VOCAB_CACHE[key] = info
    return info


@dataclass
class WordSpan:
    """Answer tokens ``[start, end)`` that decode to one word."""

    start: int
    end: int
    score: float


def word_spans(answer_ids: Sequence[int], scores: Sequence[float], info: VocabInfo) -> list[WordSpan]:
    """Group answer tokens into replaceable words.

    A word runs from a word-start token to the next one, so ``x-ray`` split as ``▁x``, ``-``,
    ``ray`` stays one word. Trailing punctuation (``lung.``) is left out of the span and kept.
    Groups that are only punctuation, begin with punctuation, or hold a special token are skipped.
    """
    groups: list[list[int]] = []
    for index, token_id in enumerate(answer_ids):
        if bool(info.special[token_id]):
            groups.append([])  # a special token closes the current word and is never replaced
            continue
        if not groups or not groups[-1] or bool(info.word_start[token_id]):
            groups.append([index])
        else:
            groups[-1].append(index)

    spans: list[WordSpan] = []
    for group in groups:
        if not group:
            continue
        head = answer_ids[group[0]]
        # SentencePiece writes a lone ``▁`` before a word that has no merged first piece, so that
        # marker belongs to the word after it. Any other leading punctuation rules the group out.
        if not bool(info.wordlike[head]) and not (bool(info.bare_marker[head]) and len(group) > 1
                                                   and bool(info.wordlike[answer_ids[group[1]]])):
            continue
        last = max((i for i in group if bool(info.wordlike[answer_ids[i]])), default=None)
        if last is None:
            continue
        core = [i for i in group if i <= last]
        spans.append(WordSpan(core[0], last + 1, max(float(scores[i]) for i in core)))
    return spans


def choose_replacement(
    logits_full: torch.Tensor,      # (V,)
    logits_drop: torch.Tensor,      # (V,)
    original_id: int,
    beta: float,
    alpha: float,
    allowed: torch.Tensor,          # (V,) bool
) -> int:
    """Pick the plausible-without-image token that the image supports least."""
    vocab = min(logits_full.shape[-1], allowed.shape[0])
    logits_full, logits_drop, allowed = logits_full[:vocab], logits_drop[:vocab], allowed[:vocab].clone()
    if 0 <= original_id < vocab:
        allowed[original_id] = False
    p_drop = torch.softmax(logits_drop, dim=-1)                            # (V,)
    plausible = (p_drop >= alpha * p_drop.max()) & allowed
    if bool(plausible.any()):
        contrast = p_diff(logits_full, logits_drop, beta)                 # (V,)
        masked = contrast.masked_fill(~plausible, float("inf"))
        return int(masked.argmin())
    # No plausible candidate: the most likely allowed token without the image (the runner-up).
    return int(p_drop.masked_fill(~allowed, -1.0).argmax())


@dataclass
class Candidate:
    """One graded dispreferred answer."""

    text: str
    token_ids: list[int]
    num_replaced: int
    replaced_positions: list[int] = field(default_factory=list)   # answer-token index of each replaced word
    replaced_tokens: list[str] = field(default_factory=list)
    token_positions: list[int] = field(default_factory=list)      # index of each replacement in token_ids


def graded_candidates(
    answer_ids: Sequence[int],          # y_w tokens (may end with EOS)
    scores: Sequence[float],            # s_t per answer token
    logits_full: torch.Tensor,          # (A, V)
    logits_drop: torch.Tensor,          # (A, V)
    tokenizer: Any,
    info: VocabInfo,
    num_coupled: int = 10,
    beta: float = 0.9,
    alpha: float = 0.1,
) -> tuple[list[Candidate], list[WordSpan], dict[int, int]]:
    """Build ``y_l(m)`` for m = 1..n by replacing the m most coupled words; merge identical texts.

    Returns the candidates (in increasing m), the coupled word spans (most coupled first) and the
    replacement token chosen for each coupled span's start position.
    """
    answer_ids = list(answer_ids)
    spans = word_spans(answer_ids, scores, info)
    # Most coupled first; ties go to the earlier word so the order is deterministic.
    spans.sort(key=lambda s: (-s.score, s.start))
    coupled = spans[:num_coupled]
    allowed = info.replaceable
    replacements = {
        span.start: choose_replacement(logits_full[span.start], logits_drop[span.start], answer_ids[span.start], beta, alpha, allowed)
        for span in coupled
    }
    reference_text = decode_answer(tokenizer, answer_ids)

    candidates: list[Candidate] = []
    seen = {reference_text}
    for m in range(1, len(coupled) + 1):
        chosen = sorted(coupled[:m], key=lambda s: s.start)
        new_ids: list[int] = []
        token_positions: list[int] = []
        cursor = 0
        for span in chosen:
            new_ids.extend(answer_ids[cursor : span.start])
            token_positions.append(len(new_ids))
            new_ids.append(replacements[span.start])
            cursor = span.end
        new_ids.extend(answer_ids[cursor:])
        text = decode_answer(tokenizer, new_ids)
        if text in seen or not text:
            continue
        seen.add(text)
        candidates.append(
            Candidate(
                text=text,
                token_ids=new_ids,
                num_replaced=m,
                replaced_positions=[s.start for s in chosen],
                replaced_tokens=[tokenizer.convert_ids_to_tokens(replacements[s.start]) for s in chosen],
                token_positions=token_positions,
            )
        )
    return candidates, coupled, replacements


def decode_answer(tokenizer: Any, token_ids: Sequence[int]) -> str:
    return tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
