"""Helpers shared by the training tests: preference rows with real images on disk."""

from __future__ import annotations

from pathlib import Path

from hscr.preferences import PreferenceRow
from support import random_image

QUESTIONS = [
    ("is there a lesion in the left lung ?", "yes", ["no", "yes the right lobe", "two lesions"]),
    ("what modality is this image ?", "x-ray", ["ct", "mri", "ultrasound"]),
    ("which organ is shown ?", "chest", ["brain", "liver"]),
    ("how many lesions are visible ?", "two", ["three", "one", "zero"]),
    ("where is the abnormality located ?", "left upper lobe", ["right upper lobe", "left lower zone"]),
    ("is the heart enlarged ?", "no", ["yes"]),
]


def make_rows(folder: Path, count: int = 6, with_refs: bool = False) -> list[PreferenceRow]:
    """``count`` rows with 1-3 rejected answers each; reference log-probs unknown unless ``with_refs``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        question, chosen, rejected = QUESTIONS[index % len(QUESTIONS)]
        path = folder / f"image_{index}.png"
        random_image(index).save(path)
        rows.append(
            PreferenceRow(
                sample_id=f"s{index}",
                dataset="test",
                split="train",
                image_path=str(path.resolve()),
                question=question,
                answer_type="closed",
                chosen=chosen,
                rejected=list(rejected),
                similarities=[0.9 - 0.2 * j for j in range(len(rejected))],
                ref_chosen_logp=-3.0 if with_refs else None,
                ref_rejected_logps=[-4.0 - j for j in range(len(rejected))] if with_refs else [None] * len(rejected),
            )
        )
    return rows
