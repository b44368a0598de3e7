"""The demo build's recipe and the manifest that marks a finished model folder.

This module imports no torch, so checking whether the demo is already built stays fast.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hscr.demo.phantoms import GENERATOR_VERSION
from hscr.errors import HSCRError

# File written last into a model folder; a folder without it is an interrupted build.
MANIFEST = "demo_manifest.json"

# Bump this when the training code changes in a way that changes the weights.
TRAINER_VERSION = 1


@dataclass
class DemoRecipe:
    """Everything that determines the demo model's weights."""

    seed: int = 0
    data_seed: int = 0
    render_size: int = 128          # stored phantom images; the processor resizes them
    image_size: int = 64            # model input
    patch_size: int = 16            # 16 image tokens
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    text_intermediate: int = 256
    train_images: int = 2500
    validation_images: int = 150    # drawn after the training pool in the train split
    test_images: int = 300
    steps: int = 3000               # minimum number of optimizer steps
    max_steps: int = 5000           # keep training up to here while lesion accuracy is low
    eval_every: int = 500
    lesion_threshold: float = 0.75  # held-out closed accuracy on lesion questions
    batch_size: int = 32
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    local_weight: float = 3.0       # lesion questions are drawn this many times more often
    threads: int = 1                # torch threads while building; see the note below

    # NOTE: with 2 threads on 2 busy cores, a training step took 13 times longer than with 1 thread,
    # because OpenMP workers spin while waiting for a core. The matrices of this model are too
    # small to gain much from a second thread, so the default is 1.

    def __post_init__(self) -> None:
        for name in ("render_size", "image_size", "patch_size", "vision_hidden", "vision_layers", "text_hidden",
                     "text_layers", "text_intermediate", "train_images", "validation_images", "test_images",
                     "steps", "max_steps", "eval_every", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise HSCRError(f"invalid {name}={getattr(self, name)!r}: expected an integer >= 1")
        if self.max_steps < self.steps:
            raise HSCRError(f"invalid max_steps={self.max_steps}: expected at least steps={self.steps}")
        if self.image_size % self.patch_size:
            raise HSCRError(f"invalid patch_size={self.patch_size}: it must divide image_size={self.image_size}")
        if self.render_size < self.image_size:
            raise HSCRError(f"invalid render_size={self.render_size}: expected at least image_size={self.image_size}")
        if not 0.0 <= self.lesion_threshold <= 1.0:
            raise HSCRError(f"invalid lesion_threshold={self.lesion_threshold}: expected a value in [0, 1]")
        if self.learning_rate <= 0 or self.local_weight <= 0:
            raise HSCRError("invalid learning_rate or local_weight: expected values > 0")

    def spec(self):
        """Return the model sizes as a :class:`hscr.models.tiny.TinySpec`."""
        # Imported here: the hscr.models package imports torch.
        from hscr.models.tiny import TinySpec

        return TinySpec(
            image_size=self.image_size,
            patch_size=self.patch_size,
            vision_hidden=self.vision_hidden,
            vision_layers=self.vision_layers,
            vision_heads=2,
            text_hidden=self.text_hidden,
            text_layers=self.text_layers,
            text_heads=4,
            text_kv_heads=2,
            text_intermediate=self.text_intermediate,
            max_positions=256,
            tokenizer="word",
            seed=self.seed,
        )

    def key(self) -> str:
        """Hash of the recipe and the code versions: equal keys give the same model."""
        values = asdict(self)
        values.pop("threads")
        raw = json.dumps({"recipe": values, "generator": GENERATOR_VERSION, "trainer": TRAINER_VERSION},
                         sort_keys=True)
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:16]


def read_manifest(model_dir: str | Path) -> dict[str, Any] | None:
    """Return the manifest of a complete demo model folder, or None."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
