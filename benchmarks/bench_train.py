"""Training throughput: MLPO with a shared prefix vs the prefix repeated per answer vs TRL's DPOTrainer.

All three run in this one process on the same tiny LLaVA (CLIP + Mistral, 576 image tokens per
image as in LLaVA-Med v1.5) and the same preference data (short answers, k = 3 rejected answers
per sample):

- ``mlpo_shared``: :func:`hscr.trainer.train` with the packed forward (prefix computed once).
- ``mlpo_repeated``: the same trainer with ``shared_prefix=false`` (one sequence per answer).
- ``trl_dpo``: TRL's ``DPOTrainer`` with LoRA on the 6 pair rows per sample that carry the same
  signal (3 explicit: chosen vs each rejected; 3 implicit: less wrong vs more wrong). TRL scores
  chosen and rejected as full sequences and runs the reference pass (adapter disabled) on the fly,
  because it refuses precomputed reference log-probs for vision datasets.

Samples per second count preference samples (one image, question, chosen and k rejected), so
TRL's pair rows per second are divided by 6. The first steps of each run are warm-up and not
timed, and each rate comes from the median step time, which other work on a shared machine
disturbs less than the mean. The last line printed is ``speedup_vs_trl: X.XX`` (shared-prefix
MLPO over TRL).

    pip install -r requirements-bench.txt
    python benchmarks/bench_train.py --steps 6 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning. On a machine shared with other work, spinning
# threads made small matmuls about 10x slower (measured on 2 busy cores), for every method alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hscr.config import TrainConfig  # noqa: E402
from hscr.models import wrap_vlm  # noqa: E402
from hscr.models.tiny import TinySpec, build_tiny_llava  # noqa: E402
from hscr.preferences import PreferenceRow  # noqa: E402
from hscr.trainer import language_model_target_regex, train  # noqa: E402

SAMPLES = [
    ("is there a lesion in the left lung ?", "yes", ["no", "yes two", "no lesion"]),
    ("what modality is this image ?", "x-ray", ["ct", "mri", "ultrasound"]),
    ("which organ is shown ?", "chest", ["lung", "brain", "liver"]),
    ("how many lesions are visible ?", "two", ["three", "one", "zero"]),
    ("where is the abnormality located ?", "left upper lobe", ["right upper lobe", "left lower lobe", "right lower zone"]),
    ("is the heart enlarged ?", "no", ["yes", "yes cardiomegaly", "large heart"]),
]

SPEC = dict(image_size=336, patch_size=14, vision_hidden=32, vision_layers=2, vision_heads=2,
            text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=256)


def build_model():
    model, processor = build_tiny_llava(TinySpec(**SPEC))
    return model, processor


def make_rows(folder: Path, count: int) -> list[PreferenceRow]:
    rows = []
    rng = np.random.default_rng(0)
    for index in range(count):
        question, chosen, rejected = SAMPLES[index % len(SAMPLES)]
        path = folder / f"image_{index}.png"
        Image.fromarray((rng.random((336, 336, 3)) * 255).astype("uint8")).save(path)
        rows.append(PreferenceRow(
            sample_id=f"s{index}", dataset="bench", split="train", image_path=str(path), question=question,
            answer_type="closed", chosen=chosen, rejected=list(rejected), similarities=[None] * 3,
            ref_chosen_logp=-10.0, ref_rejected_logps=[-11.0, -12.0, -13.0],
        ))
    return rows


def step_rates(marks: list[tuple[float, float]], warmup: int, samples_per_step: float) -> tuple[float, float]:
    """Compute samples per wall-clock second and per CPU second from the median step after ``warmup``.

    ``marks`` contains ``(perf_counter, process_time)`` at the end of each step. CPU time counts only
    this process's threads, so it is less disturbed by other work on the machine.
    """
    timed = marks[warmup:]
    wall = [b[0] - a[0] for a, b in zip(timed, timed[1:])]
    cpu = [b[1] - a[1] for a, b in zip(timed, timed[1:])]
    return samples_per_step / statistics.median(wall), samples_per_step / statistics.median(cpu)


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def run_mlpo(rows, shared_prefix: bool, steps: int, warmup: int, batch_size: int, workdir: Path) -> tuple[float, float]:
    """Samples per second (wall clock, CPU) of the project's trainer."""
    model, processor = build_model()
    vlm = wrap_vlm(model, processor, name="bench")
    config = TrainConfig(max_steps=steps + warmup, batch_size=batch_size, lora_r=16, lora_alpha=32,
                         learning_rate=1e-4, save_steps=10_000, logging_steps=1, shared_prefix=shared_prefix)
    marks: list[tuple[float, float]] = []
    train(vlm, rows, config, workdir / ("shared" if shared_prefix else "repeated"), on_step=lambda info: marks.append(clock()))
    return step_rates(marks, warmup - 1, batch_size)


def pair_dataset(rows):
    from datasets import Dataset

    def message(role, text):
        return [{"role": role, "content": [{"type": "text", "text": text}]}]

    records = []
    for row in rows:
        image = Image.open(row.image_path).convert("RGB")
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row.question}]}]
        answers = [row.chosen] + row.rejected
        pairs = [(0, j) for j in range(1, 4)] + [(j, m) for j in range(1, 4) for m in range(j + 1, 4)]
        for better, worse in pairs:  # 3 explicit + 3 implicit pairs
            records.append({"images": [image], "prompt": prompt, "chosen": message("assistant", answers[better]),
                            "rejected": message("assistant", answers[worse])})
    return Dataset.from_list(records)


def run_trl(rows, steps: int, warmup: int, batch_size: int, workdir: Path) -> tuple[float, float]:
    """Samples per second of TRL's DPOTrainer, counting 6 pair rows as one sample."""
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(clock())

    model, processor = build_model()
    pairs_per_step = 6 * batch_size
    args = DPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=pairs_per_step, max_steps=steps + warmup,
        learning_rate=1e-4, beta=0.1, loss_type="sigmoid", max_length=None, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                             target_modules=language_model_target_regex(TrainConfig().lora_target_modules))
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=args, train_dataset=pair_dataset(rows), processing_class=processor,
                         peft_config=peft_config, callbacks=[timer])
    trainer.train()
    return step_rates(timer.marks, warmup - 1, pairs_per_step / 6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (at least 1)")
    parser.add_argument("--batch-size", type=int, default=2, help="preference samples per step")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--skip-trl", action="store_true", help="measure only the two MLPO routes")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    count = args.batch_size * (args.steps + args.warmup)
    print(f"tiny LLaVA {SPEC}, 576 image tokens, k=3, {count} samples, batch {args.batch_size}, "
          f"{args.steps} timed steps, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows = make_rows(workdir, count)
        shared, shared_cpu = run_mlpo(rows, True, args.steps, args.warmup, args.batch_size, workdir)
        print(f"mlpo_shared_prefix_samples_per_s: {shared:.3f} (per CPU second: {shared_cpu:.3f})")
        repeated, repeated_cpu = run_mlpo(rows, False, args.steps, args.warmup, args.batch_size, workdir)
        print(f"mlpo_repeated_prefix_samples_per_s: {repeated:.3f} (per CPU second: {repeated_cpu:.3f})")
        print(f"speedup_shared_vs_repeated: {shared / repeated:.2f} (CPU time: {shared_cpu / repeated_cpu:.2f})")
        if args.skip_trl:
            return
        trl, trl_cpu = run_trl(rows, args.steps, args.warmup, args.batch_size, workdir)
        print(f"trl_dpo_samples_per_s: {trl:.3f} (per CPU second: {trl_cpu:.3f})")
    print(f"speedup_vs_trl_cpu_time: {shared_cpu / trl_cpu:.2f}")
    print(f"speedup_vs_trl: {shared / trl:.2f}")


if __name__ == "__main__":
    main()
