"""Test support: tiny models, images and folders that every test module reuses."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from hscr.models import wrap_vlm
from hscr.models.tiny import TinySpec, build_tiny_llava


def tiny_vlm(**spec_fields):
    """A randomly initialised tiny LLaVA (CLIP + Mistral) wrapped with its adapter, fp32 on CPU."""
    model, processor = build_tiny_llava(TinySpec(**spec_fields))
    return wrap_vlm(model, processor, name="tiny")


def save_tiny_model(path: Path, **spec_fields) -> Path:
    model, processor = build_tiny_llava(TinySpec(**spec_fields))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def random_image(seed: int = 0, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def write_image_folder(folder: Path, rows: list[dict], image_size: int = 64) -> Path:
    """Write PNG images and a samples.csv with the given rows (image names are created)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted({row["image"] for row in rows})
    for index, name in enumerate(names):
        random_image(index, image_size).save(folder / name)
    fields = list(rows[0].keys())
    with open(folder / "samples.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return folder
