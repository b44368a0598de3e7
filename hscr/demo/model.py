"""Train the demo model: a tiny LLaVA (CLIP vision + Mistral text) learned from scratch on phantoms.

The model is meant to be imperfect in the way HSCR targets. A model this small learns the global
cues (modality, organ) within a few hundred steps and the local ones (lesion presence, side,
count) much later. So lesion questions are sampled more often, lesions are drawn large enough to
cover whole pixels at the 64-pixel input, and the build keeps training until a held-out lesion
accuracy threshold is met or a step limit is reached.

    from hscr.demo.model import DemoRecipe, train_demo_model
    report = train_demo_model(DemoRecipe(steps=300, max_steps=300), "/tmp/demo-model")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from hscr.demo.phantoms import GENERATOR_VERSION, QA, Phantom, all_questions, make_phantom, question_corpus, stored_questions
from hscr.demo.recipe import MANIFEST, TRAINER_VERSION, DemoRecipe
from hscr.models.tiny import build_tiny_llava

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# -- tokenizer -------------------------------------------------------------------------------------


def _vocabulary_text(text: str) -> str:
    """Apply the tokenizer's normalization in Python, for building the word list."""
    return text.lower().replace("?", " ?").replace(",", " ,")


def build_demo_model(recipe: DemoRecipe):
    """Build the untrained model and its processor, with a word vocabulary of the question templates."""
    from tokenizers import normalizers

    corpus = [_vocabulary_text(t) for t in question_corpus()]
    model, processor = build_tiny_llava(recipe.spec(), corpus=corpus)
    # Lowercase and split off "?" and "," so that a question typed as "Is this an MRI?" maps to
    # known words. Special tokens ([INST], <image>) are matched before normalization.
    processor.tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([
        normalizers.Replace("\n", " "),
        normalizers.Lowercase(),
        normalizers.Replace("?", " ?"),
        normalizers.Replace(",", " ,"),
    ])
    return model, processor


# -- data ------------------------------------------------------------------------------------------


@dataclass
class EncodedSet:
    """Question rows with token ids, for training and fast evaluation."""

    pixel_values: torch.Tensor      # (num_images, 3, H, W)
    image_rows: np.ndarray          # (M,) row -> image
    prompt_ids: list[list[int]]     # image placeholders expanded
    answer_ids: list[list[int]]     # answer + EOS
    qas: list[QA]

    def __len__(self) -> int:
        return len(self.qas)


def encode_set(vlm, phantoms: Sequence[Phantom], questions: Callable[[Phantom], list[QA]]) -> EncodedSet:
    """Preprocess the images once and tokenize every (image, question, answer) row."""
    adapter = vlm.adapter
    pixel_values = adapter.pixel_values([p.image() for p in phantoms])["pixel_values"]
    num_image_tokens = _num_image_tokens(vlm)
    prompt_cache: dict[str, list[int]] = {}
    answer_cache: dict[str, list[int]] = {}
    rows, prompts, answers, qas = [], [], [], []
    for index, phantom in enumerate(phantoms):
        for qa in questions(phantom):
            if qa.question not in prompt_cache:
                prompt_cache[qa.question] = adapter.prompt_ids([adapter.prompt(qa.question)], num_image_tokens)[0]
            if qa.answer not in answer_cache:
                answer_cache[qa.answer] = adapter.answer_ids(qa.answer)
            rows.append(index)
            prompts.append(prompt_cache[qa.question])
            answers.append(answer_cache[qa.answer])
            qas.append(qa)
    return EncodedSet(pixel_values, np.asarray(rows, dtype=np.int64), prompts, answers, qas)


def _num_image_tokens(vlm) -> int:
    vision = vlm.model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def _training_batch(data: EncodedSet, rows: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids with labels on the answer tokens only."""
    sequences = [data.prompt_ids[r] + data.answer_ids[r] for r in rows]
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        prompt, answer = data.prompt_ids[r], data.answer_ids[r]
        input_ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
        attention_mask[i, : len(prompt) + len(answer)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": data.pixel_values[torch.as_tensor(data.image_rows[rows])],
    }


# -- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_answer_ids(
    vlm,
    data: EncodedSet,
    drop_ratio: float = 0.0,
    seed: int = 0,
    max_new_tokens: int = 6,
    batch_size: int = 64,
) -> list[list[int]]:
    """Decode every row of ``data`` greedily, optionally with a share of image tokens removed.

    Rows are grouped by prompt length, so a group needs no padding. The dropout draw of row ``i``
    is seeded with ``seed + i``.
    """
    from hscr.contrast import apply_dropout, draw_dropped_positions
    from hscr.sequences import answer_logits, build_batch

    adapter, model = vlm.adapter, vlm.model
    eos = adapter.tokenizer.eos_token_id
    pad = adapter.tokenizer.pad_token_id or 0
    by_length: dict[int, list[int]] = {}
    for row, prompt in enumerate(data.prompt_ids):
        by_length.setdefault(len(prompt), []).append(row)
    outputs: list[list[int]] = [[] for _ in range(len(data))]
    for rows_of_length in by_length.values():
        for start in range(0, len(rows_of_length), batch_size):
            rows = rows_of_length[start : start + batch_size]
            image_rows = data.image_rows[rows]
            unique, inverse = np.unique(image_rows, return_inverse=True)
            features = adapter.image_features(model, {"pixel_values": data.pixel_values[torch.as_tensor(unique)]})
            prompts = [data.prompt_ids[r] for r in rows]
            answers: list[list[int]] = [[] for _ in rows]
            active = list(range(len(rows)))
            for _ in range(max_new_tokens):
                # A placeholder after the answer so far makes its last logit predict the next token.
                batch = build_batch(adapter, model, [prompts[i] for i in active], [answers[i] + [pad] for i in active],
                                    features, [int(inverse[i]) for i in active])
                if drop_ratio > 0:
                    dropped = draw_dropped_positions(batch.image_token_mask, drop_ratio, [seed + rows[i] for i in active])
                    batch = apply_dropout(batch, dropped, "remove")
                logits = answer_logits(adapter, model, batch)                 # (R, A, V)
                still = []
                for slot, i in enumerate(active):
                    next_id = int(logits[slot, len(answers[i])].argmax())
                    answers[i].append(next_id)
                    if next_id != eos:
                        still.append(i)
                active = still
                if not active:
                    break
            for i, r in enumerate(rows):
                outputs[r] = answers[i]
    return outputs


def evaluate_set(vlm, data: EncodedSet, drop_ratio: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """Score greedy answers with :func:`hscr.metrics.score_answer` (paper protocol), overall and
    for global and lesion questions separately."""
    from hscr.metrics import score_answer

    ids = greedy_answer_ids(vlm, data, drop_ratio=drop_ratio, seed=seed)
    tokenizer = vlm.tokenizer
    groups: dict[str, list[float]] = {}
    exact: list[float] = []
    for qa, answer_ids in zip(data.qas, ids):
        prediction = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        score = score_answer(prediction, qa.answer, qa.answer_type)["paper"]
        kind = "lesion" if qa.local else "global"
        groups.setdefault(qa.answer_type, []).append(score)
        groups.setdefault(f"{qa.answer_type}_{kind}", []).append(score)
        if qa.answer_type == "open":
            exact.append(float(prediction == qa.answer))
    result = {name: round(float(np.mean(values)), 4) for name, values in sorted(groups.items())}
    result["open_exact"] = round(float(np.mean(exact)), 4) if exact else None
    result["rows"] = len(data)
    return result


def majority_baseline(train: EncodedSet, test: EncodedSet) -> dict[str, float]:
    """Compute the closed accuracy of always giving the most common training answer.

    ``overall`` uses one answer for all closed questions. ``per_question`` uses the most common
    answer of each question text, which is what a model that ignores the image can reach.
    """
    overall: dict[str, int] = {}
    per_question: dict[str, dict[str, int]] = {}
    for qa in train.qas:
        if qa.answer_type == "closed":
            overall[qa.answer] = overall.get(qa.answer, 0) + 1
            counts = per_question.setdefault(qa.question, {})
            counts[qa.answer] = counts.get(qa.answer, 0) + 1
    top = max(overall, key=overall.get)
    closed = [qa for qa in test.qas if qa.answer_type == "closed"]
    per_question_top = {q: max(c, key=c.get) for q, c in per_question.items()}
    return {
        "answer": top,
        "overall": round(float(np.mean([qa.answer == top for qa in closed])), 4),
        "per_question": round(float(np.mean([qa.answer == per_question_top.get(qa.question, top) for qa in closed])), 4),
    }


# -- training --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _learning_rate(recipe: DemoRecipe, step: int) -> float:
    # Linear warmup, then constant: the build may run past ``steps``, so no decay schedule.
    return recipe.learning_rate * min(1.0, (step + 1) / max(1, recipe.warmup_steps))


def _sampling_weights(data: EncodedSet, recipe: DemoRecipe) -> np.ndarray:
    """Probability of each row: every image equally often, lesion questions ``local_weight`` times."""
    weights = np.array([recipe.local_weight if qa.local else 1.0 for qa in data.qas])
    per_image = np.bincount(data.image_rows, weights=weights)
    weights = weights / per_image[data.image_rows]
    return weights / weights.sum()


@dataclass
class TrainReport:
    """Summary of a build: steps, time, validation history and held-out scores."""

    key: str
    steps: int
    seconds: float
    threshold_met: bool
    validation: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, Any] = field(default_factory=dict)
    test_drop70: dict[str, Any] = field(default_factory=dict)
    majority: dict[str, Any] = field(default_factory=dict)
    num_parameters: int = 0


def draw_phantoms(split: str, start: int, count: int, recipe: DemoRecipe,
                  progress: Callable[[str, int, int], None] | None = None, total: int | None = None) -> list[Phantom]:
    """Draw phantoms ``start .. start + count - 1`` of ``split``, reporting each to ``progress``."""
    phantoms = []
    for index in range(start, start + count):
        phantoms.append(make_phantom(split, index, recipe.data_seed, recipe.render_size))
        if progress:
            progress("phantoms", 1, total or count)
    return phantoms


def train_demo_model(
    recipe: DemoRecipe,
    output_dir: str | Path,
    progress: Callable[[str, int, int], None] | None = None,
    train_phantoms: Sequence[Phantom] | None = None,
) -> TrainReport:
    """Train the demo model, evaluate it on the test split and save it (bf16) to ``output_dir``.

    ``progress(stage, advance, total)`` is called as phantoms are drawn and steps are taken.
    ``train_phantoms`` may pass the already drawn training pool (train split, from index 0).
    """
    from hscr.models import wrap_vlm

    started = time.monotonic()
    output_dir = Path(output_dir)
    with _torch_threads(recipe.threads):
        model, processor = build_demo_model(recipe)
        vlm = wrap_vlm(model, processor, name="demo")

        # Phantoms: the training pool, a validation slice after it, and the test split.
        total = recipe.train_images + recipe.validation_images + recipe.test_images
        if train_phantoms is None:
            train_phantoms = draw_phantoms("train", 0, recipe.train_images, recipe, progress, total)
        validation = draw_phantoms("train", recipe.train_images, recipe.validation_images, recipe, progress, total)
        test = draw_phantoms("test", 0, recipe.test_images, recipe, progress, total)

        train_set = encode_set(vlm, train_phantoms, all_questions)
        validation_set = encode_set(vlm, validation, lambda p: [qa for qa in all_questions(p) if qa.answer_type == "closed"])
        test_set = encode_set(vlm, test, lambda p: stored_questions(p, recipe.data_seed))
        logger.info("demo data: %d training rows on %d images, %d validation rows, %d test rows",
                    len(train_set), len(train_phantoms), len(validation_set), len(test_set))

        report = _train(vlm, recipe, train_set, validation_set, progress)

        model.eval()
        report.test = evaluate_set(vlm, test_set)
        report.test_drop70 = evaluate_set(vlm, test_set, drop_ratio=0.7, seed=recipe.seed)
        report.majority = majority_baseline(train_set, test_set)
        report.num_parameters = sum(p.numel() for p in model.parameters())
        report.seconds = round(time.monotonic() - started, 1)

    save_model(model, processor, output_dir, recipe, report)
    return report


def _train(vlm, recipe: DemoRecipe, train_set: EncodedSet, validation_set: EncodedSet,
           progress: Callable[[str, int, int], None] | None) -> TrainReport:
    model = vlm.model
    pad_id = vlm.tokenizer.pad_token_id
    rng = np.random.default_rng(recipe.seed)
    probabilities = _sampling_weights(train_set, recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    report = TrainReport(key=recipe.key(), steps=0, seconds=0.0, threshold_met=False)
    model.train()
    step = 0
    while step < recipe.max_steps:
        rows = rng.choice(len(train_set), size=recipe.batch_size, p=probabilities)
        batch = _training_batch(train_set, rows, pad_id)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(recipe, step)
        loss = model(**batch).loss
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"demo training diverged at step {step}: loss {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if progress:
            progress("train", 1, recipe.steps)

        if step % recipe.eval_every == 0 or step == recipe.steps:
            model.eval()
            scores = evaluate_set(vlm, validation_set)
            model.train()
            lesion = scores.get("closed_lesion", 0.0)
            report.validation.append({"step": step, "loss": round(loss.item(), 4),
                                      "closed": scores.get("closed"), "closed_lesion": lesion})
            logger.info("demo step %d: loss %.3f, validation closed %.3f, lesion questions %.3f",
                        step, loss.item(), scores.get("closed", 0.0), lesion)
            if step >= recipe.steps and lesion >= recipe.lesion_threshold:
                report.threshold_met = True
                break
    if not report.threshold_met:
        logger.warning("demo model stopped at %d steps with lesion accuracy below %.2f", step, recipe.lesion_threshold)
    report.steps = step
    model.eval()
    return report


# -- saving ----------------------------------------------------------------------------------------

def save_model(model, processor, output_dir: Path, recipe: DemoRecipe, report: TrainReport) -> None:
    """Save weights in bf16 with the processor, then the manifest that marks the folder complete."""
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = output_dir / MANIFEST
    manifest_path.unlink(missing_ok=True)
    model.to(torch.bfloat16)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    model.to(torch.float32)
    weights = output_dir / "model.safetensors"
    manifest = {
        "key": recipe.key(),
        "recipe": asdict(recipe),
        "generator_version": GENERATOR_VERSION,
        "trainer_version": TRAINER_VERSION,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else None,
        "report": asdict(report),
    }
    # Written last: a folder without the manifest is an interrupted build.
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(manifest_path)
