"""MLPO training with LoRA on the language model: data order, loop, metrics, checkpoints, resume.

The vision tower and projector stay frozen, and LoRA adapters sit on the language model only.
Each sample's chosen answer and up to k rejected answers share one image + prompt prefix, computed
once per step by the packed forward in :mod:`hscr.packing`. Reference log-probs come with the
preference rows. Those that a reviewer's edit made unknown are computed once at the start with
the unchanged model and cached in ``<output>/reference_logps.json``.

Outputs under ``<output>``:

- ``effective_config.json``: every setting of the run.
- ``metrics.jsonl``: one JSON object per logging step, with slash names.
- ``checkpoint-<step>/``: adapter, optimizer, scheduler, RNG states and ``trainer_state.json``,
  every ``save_steps`` optimizer steps and when SIGTERM or SIGINT arrives.
- ``adapter/``: the final adapter in PEFT format, for
  ``PeftModel.from_pretrained(base_model, "<output>/adapter")``.

Data order is a function of the seed, the epoch and the global batch size only, so a resumed run
sees the same batches as an uninterrupted one, and N processes with micro-batch b see the same
global batches as one process with micro-batch N * b.

    python -m hscr train --model data/demo/model --db data/hscr.duckdb --output data/runs/t1
    accelerate launch --multi_gpu --num_processes 2 -m hscr train --model ... --data prefs.parquet --output ...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hscr.config import TrainConfig
from hscr.errors import DataError, HSCRError
from hscr.mlpo import mlpo_loss
from hscr.models.base import VLM, FamilyAdapter
from hscr.packing import build_packed_batch, packed_logps, repeated_logps
from hscr.sequences import encode_images

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.jsonl"
REFERENCE_FILE = "reference_logps.json"
STATE_FILE = "trainer_state.json"
EFFECTIVE_CONFIG_FILE = "effective_config.json"
CHECKPOINT_PREFIX = "checkpoint-"


# -- LoRA ---------------------------------------------------------------------------------------


def language_model_target_regex(module_names: str) -> str:
    """Regex for peft's ``target_modules`` that matches the names inside the language model only.

    Plain names such as ``q_proj`` would also match the CLIP vision tower.
    """
    names = [name.strip() for name in module_names.split(",") if name.strip()]
    if not names:
        raise HSCRError("invalid lora_target_modules='': expected comma-separated module names such as q_proj,v_proj")
    alternatives = "|".join(re.escape(name) for name in names)
    return rf"(.*\.)?language_model\..*\.({alternatives})"


def apply_lora(model: Any, config: TrainConfig) -> Any:
    """Freeze ``model`` and wrap it in a ``PeftModel`` with LoRA on the language model."""
    from peft import LoraConfig, get_peft_model

    for param in model.parameters():
        param.requires_grad_(False)
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=language_model_target_regex(config.lora_target_modules),
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as exc:
        raise HSCRError(
            f"LoRA could not be applied with lora_target_modules={config.lora_target_modules!r}: {exc}"
        ) from None
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    outside = [name for name in trainable if "language_model" not in name]
    if outside:
        # A guard against a target regex that reaches the vision tower or projector.
        raise HSCRError(f"LoRA reached modules outside the language model: {outside[:3]}")
    return peft_model


# -- data ---------------------------------------------------------------------------------------


@dataclass
class TrainSample:
    """One preference row tokenized for training."""

    sample_id: str
    image_path: str
    prompt_ids: list[int]                 # image placeholders expanded
    responses: list[list[int]]            # chosen first, then up to k rejected, least wrong first
    ref_logps: list[float | None]         # one per response; None: compute with the reference model


def prepare_samples(
    rows: Sequence[Any],
    adapter: FamilyAdapter,
    num_image_tokens: int,
    num_dispreferred: int,
) -> list[TrainSample]:
    """Tokenize preference rows (``hscr.preferences.PreferenceRow`` or any object with its fields)."""
    samples = []
    for row in rows:
        rejected = list(row.rejected)[:num_dispreferred]
        if not str(row.chosen).strip():
            raise DataError(f"sample {row.sample_id}: the chosen answer is empty; edit it or reject the sample")
        if not rejected:
            raise DataError(f"sample {row.sample_id}: no rejected answer; generate candidates or leave the sample out")
        ref_rejected = list(row.ref_rejected_logps or [])[: len(rejected)]
        ref_rejected += [None] * (len(rejected) - len(ref_rejected))
        prompt = adapter.prompt_ids([adapter.prompt(row.question)], num_image_tokens)[0]
        responses = [adapter.answer_ids(row.chosen)] + [adapter.answer_ids(text) for text in rejected]
        samples.append(
            TrainSample(
                sample_id=str(row.sample_id),
                image_path=str(row.image_path),
                prompt_ids=prompt,
                responses=responses,
                ref_logps=[_finite_or_none(row.ref_chosen_logp)] + [_finite_or_none(v) for v in ref_rejected],
            )
        )
    return samples


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def load_images(paths: Sequence[str]) -> list[Any]:
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except FileNotFoundError:
            raise DataError(f"image file not found: {path}; re-import the dataset or fix image_path") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"image {path} is not readable: {exc}") from None
    return images


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """Shuffled sample indices of one epoch, a function of the seed and the epoch only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


@dataclass(frozen=True)
class Schedule:
    """Mapping from optimizer steps to sample indices, per process and micro-batch."""

    num_samples: int
    batch_size: int            # per process and micro-batch
    grad_accum_steps: int
    num_processes: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.num_processes

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.global_batch)

    def total_steps(self, epochs: float, max_steps: int) -> int:
        if max_steps > 0:
            return max_steps
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def step_indices(self, step: int) -> list[int]:
        """Sample indices of optimizer step ``step``; a short last batch is filled from the epoch's start."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.num_samples, self.seed, epoch)
        start = within * self.global_batch
        indices = order[start : start + self.global_batch]
        while len(indices) < self.global_batch:
            indices += order[: self.global_batch - len(indices)]
        return indices

    def micro_batch(self, step: int, micro: int, process: int) -> list[int]:
        """Indices for one process's micro-batch ``micro`` of step ``step``."""
        indices = self.step_indices(step)
        per_micro = self.batch_size * self.num_processes
        chunk = indices[micro * per_micro : (micro + 1) * per_micro]
        return chunk[process * self.batch_size : (process + 1) * self.batch_size]


# -- the model wrapper ----------------------------------------------------------------------------


class MLPOPolicy(torch.nn.Module):
    """Summed log-probs of every sample's answers, as one ``forward`` that DDP and FSDP can wrap."""

    def __init__(self, model: Any, adapter: FamilyAdapter, shared_prefix: bool = True):
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.shared_prefix = shared_prefix

    def forward(self, samples: Sequence[TrainSample], images: Sequence[Any]) -> torch.Tensor:
        unique_paths = list(dict.fromkeys(s.image_path for s in samples))
        # The vision tower and projector are frozen: their features need no graph.
        with torch.no_grad():
            features = encode_images(self.adapter, self.model, images)          # (U, N, D)
        image_rows = [unique_paths.index(s.image_path) for s in samples]
        prompts = [s.prompt_ids for s in samples]
        responses = [s.responses for s in samples]
        if self.shared_prefix:
            batch = build_packed_batch(self.adapter, self.model, prompts, responses, features, image_rows)
            return packed_logps(self.adapter, self.model, batch)                # (B, R)
        return repeated_logps(self.adapter, self.model, prompts, responses, features, image_rows)


def policy_inputs(samples: Sequence[TrainSample]) -> tuple[list[TrainSample], list[Any]]:
    unique_paths = list(dict.fromkeys(s.image_path for s in samples))
    return list(samples), load_images(unique_paths)


def reference_tensors(samples: Sequence[TrainSample], num_responses: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs ``(B, R)`` (NaN at missing answers) and the answer mask ``(B, R)``."""
    refs = torch.full((len(samples), num_responses), float("nan"), dtype=torch.float32)
    mask = torch.zeros((len(samples), num_responses), dtype=torch.bool)
    for row, sample in enumerate(samples):
        for slot, value in enumerate(sample.ref_logps):
            refs[row, slot] = float("nan") if value is None else value
            mask[row, slot] = True
    return refs.to(device), mask.to(device)


@torch.no_grad()
def fill_reference_logps(
    policy: MLPOPolicy,
    samples: list[TrainSample],
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
) -> dict[str, list[float]]:
    """Compute the unknown reference log-probs with ``policy`` (the model before LoRA).

    Each process computes its share; the caller gathers. Returns ``{sample_id: [logp per response]}``.
    """
    todo = [s for s in samples if any(v is None for v in s.ref_logps)][process_index::num_processes]
    was_training = policy.training
    policy.eval()
    computed: dict[str, list[float]] = {}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        logps = policy(*policy_inputs(chunk)).float().cpu()                   # (B, R)
        for row, sample in enumerate(chunk):
            computed[sample.sample_id] = logps[row, : len(sample.responses)].tolist()
    policy.train(was_training)
    return computed


def apply_reference_logps(samples: list[TrainSample], computed: dict[str, list[float]]) -> int:
    """Fill missing reference values from ``computed``; returns how many values were filled."""
    filled = 0
    for sample in samples:
        values = computed.get(sample.sample_id)
        if values is None:
            continue
        for slot, value in enumerate(sample.ref_logps):
            if value is None and slot < len(values):
                sample.ref_logps[slot] = float(values[slot])
                filled += 1
    missing = [s.sample_id for s in samples if any(v is None for v in s.ref_logps)]
    if missing:
        raise HSCRError(f"reference log-probs missing for {len(missing)} samples, for example {missing[0]}")
    return filled


# -- checkpoints ----------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    found = []
    for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


# -- the loop -------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """Outcome of a training run."""

    status: str                    # "completed" or "interrupted"
    step: int
    total_steps: int
    output_dir: Path
    adapter_dir: Path | None       # None when interrupted
    checkpoint_dir: Path | None
    last_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StepInfo:
    """Progress of the run, passed to the ``on_step`` callback after every optimizer step."""

    step: int
    total_steps: int
    epoch: float
    metrics: dict[str, float]       # this step's averaged metrics
    elapsed_s: float


class _StopSignal:
    """Record SIGTERM/SIGINT so the loop can checkpoint at the end of the current step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignal":
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:
                pass  # not the main thread: signals stay with their previous handlers
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops without waiting for the checkpoint
        self.received = signum
        logger.warning("received signal %d: saving a checkpoint after the current step", signum)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def make_accelerator(config: TrainConfig, device: torch.device | None) -> Any:
    from accelerate import Accelerator

    cpu = device is not None and torch.device(device).type == "cpu"
    cuda = torch.cuda.is_available() and not cpu
    mixed_precision = "bf16" if (config.bf16 and cuda) else "no"
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def train(
    vlm: VLM,
    rows: Sequence[Any],
    config: TrainConfig,
    output_dir: str | Path,
    resume: bool = False,
    accelerator: Any = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train LoRA adapters on ``vlm`` with MLPO over ``rows`` and write the outputs to ``output_dir``.

    ``vlm.model`` is replaced by the ``PeftModel`` (LoRA layers are injected in place). With
    ``resume`` the run continues from the latest checkpoint in ``output_dir``. Without it, an
    existing checkpoint or adapter raises ``HSCRError``, so no run is overwritten by accident.
    """
    output_dir = Path(output_dir)
    accelerator = accelerator or make_accelerator(config, vlm.device)
    is_main = accelerator.is_main_process
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    checkpoint = latest_checkpoint(output_dir) if resume else None
    if not resume and (latest_checkpoint(output_dir) is not None or (output_dir / ADAPTER_DIR).exists()):
        raise HSCRError(
            f"{output_dir} already holds a training run; pass --resume to continue it or choose a new --output"
        )
    if resume and checkpoint is None:
        logger.warning("--resume: no checkpoint in %s, starting from step 0", output_dir)
    if not rows:
        raise DataError("no preference rows to train on: generate candidates first, or relax --reviewed-only/--dataset")

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)

    # The number of image tokens fixes the prompt layout, and encoding one image gives it.
    with torch.no_grad():
        num_image_tokens = encode_images(vlm.adapter, vlm.model, load_images([rows[0].image_path])).shape[1]
    samples = prepare_samples(rows, vlm.adapter, num_image_tokens, config.num_dispreferred)
    vlm.model.to(accelerator.device)

    if config.shared_prefix and not vlm.adapter.supports_packed_prefix:
        logger.warning(
            "the %s family does not support the packed shared-prefix forward; training with one sequence "
            "per answer (set shared_prefix=false to silence this warning)", vlm.adapter.name
        )
        config = dataclasses.replace(config, shared_prefix=False)

    # Reference log-probs for edited texts, with the model before LoRA.
    reference_path = output_dir / REFERENCE_FILE
    computed: dict[str, list[float]] = {}
    if reference_path.is_file():
        computed = json.loads(reference_path.read_text(encoding="utf-8"))
    if any(v is None for s in samples for v in s.ref_logps if s.sample_id not in computed):
        from accelerate.utils import gather_object

        base_policy = MLPOPolicy(vlm.model, vlm.adapter, config.shared_prefix)
        mine = fill_reference_logps(
            base_policy,
            [s for s in samples if s.sample_id not in computed],
            config.batch_size,
            accelerator.process_index,
            accelerator.num_processes,
        )
        for part in gather_object([mine]) if accelerator.num_processes > 1 else [mine]:
            computed.update(part)
        if is_main:
            _write_json_atomic(reference_path, computed)
        logger.info("computed reference log-probs for %d samples with edited texts", len(mine))
    apply_reference_logps(samples, computed)

    torch.manual_seed(config.seed)  # LoRA initialisation is the same in every process and run
    peft_model = apply_lora(vlm.model, config)
    vlm.model = peft_model
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing keeps gradients flowing although the frozen embeddings need none.
        base = peft_model.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):  # the name in transformers 5.25
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = MLPOPolicy(peft_model, vlm.adapter, config.shared_prefix)
    policy.train()
    policy = accelerator.prepare(policy)

    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    optimizer = accelerator.prepare(optimizer)
    schedule = Schedule(len(samples), config.batch_size, config.grad_accum_steps, accelerator.num_processes, config.seed)
    total_steps = schedule.total_steps(config.epochs, config.max_steps)
    scheduler = _linear_schedule(optimizer, total_steps, config.warmup_ratio)

    step = 0
    if checkpoint is not None:
        step = _load_checkpoint(checkpoint, accelerator, policy, optimizer, scheduler, schedule, total_steps)
        logger.info("resumed from %s at step %d of %d", checkpoint, step, total_steps)
    elif is_main:
        # Not train_config.json: the app writes its request there, in a run folder it shares.
        _write_json_atomic(output_dir / EFFECTIVE_CONFIG_FILE, dataclasses.asdict(config))

    logger.info(
        "training %d samples, %d steps (global batch %d over %d processes, %s, %d trainable parameters)",
        len(samples), total_steps, schedule.global_batch, accelerator.num_processes,
        accelerator.distributed_type.value, sum(p.numel() for p in trainable),
    )
    metrics_path = output_dir / METRICS_FILE
    if is_main:
        _truncate_metrics(metrics_path, step)
    window: list[dict[str, float]] = []
    window_start = time.perf_counter()
    started = time.perf_counter()
    last_metrics: dict[str, float] = {}
    last_saved = step if checkpoint is not None else -1
    status = "completed"

    with _StopSignal() as stop:
        while step < total_steps:
            step_metrics = _train_step(
                accelerator, policy, optimizer, samples, schedule, step, config
            )
            scheduler.step()
            step += 1
            step_metrics["lr"] = scheduler.get_last_lr()[0]
            window.append(step_metrics)
            epoch = step / schedule.steps_per_epoch
            last_metrics = step_metrics

            if step % config.logging_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                record = _average(window)
                record["samples_per_second"] = len(window) * schedule.global_batch / max(elapsed, 1e-9)
                record.update(step=step, epoch=round(epoch, 4))
                if is_main:
                    with open(metrics_path, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                logger.debug("step %d: %s", step, record)
                window, window_start = [], time.perf_counter()
            if on_step is not None and is_main:
                on_step(StepInfo(step, total_steps, epoch, step_metrics, time.perf_counter() - started))

            stop_now = _any_process(accelerator, stop.received is not None)
            if step % config.save_steps == 0 or (stop_now and step < total_steps):
                checkpoint = _save_checkpoint(
                    output_dir, accelerator, policy, optimizer, scheduler, schedule, step, total_steps, config
                )
                last_saved = step
            if stop_now and step < total_steps:
                status = "interrupted"
                break

    accelerator.wait_for_everyone()
    adapter_dir = None
    if status == "completed":
        adapter_dir = output_dir / ADAPTER_DIR
        _save_adapter(accelerator, policy, adapter_dir)
        if last_saved != step and is_main:
            logger.info("finished at step %d; adapter saved to %s", step, adapter_dir)
    accelerator.wait_for_everyone()
    return TrainResult(status, step, total_steps, output_dir, adapter_dir, checkpoint, last_metrics)


def _train_step(accelerator, policy, optimizer, samples, schedule, step, config) -> dict[str, float]:
    """One optimizer step over ``grad_accum_steps`` micro-batches; returns the averaged metrics."""
    collected: list[dict[str, float]] = []
    for micro in range(config.grad_accum_steps):
        chunk = [samples[i] for i in schedule.micro_batch(step, micro, accelerator.process_index)]
        last = micro == config.grad_accum_steps - 1
        # Gradients are all-reduced only on the last micro-batch of the step.
        sync = accelerator.no_sync(policy) if not last else _nullcontext()
        with sync:
            with accelerator.autocast():
                logps = policy(*policy_inputs(chunk)).float()                   # (B, R)
            refs, mask = reference_tensors(chunk, logps.shape[1], logps.device)
            out = mlpo_loss(
                logps[:, 0],
                logps[:, 1:],
                refs[:, 0],
                refs[:, 1:],
                mask[:, 1:],
                gamma=config.gamma,
                implicit_weight=config.implicit_weight,
            )
            accelerator.backward(out.loss / config.grad_accum_steps)
        collected.append({name: float(value) for name, value in out.metrics.items()})

    if config.max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], config.max_grad_norm)
    else:
        grad_norm = None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    metrics = _average(collected)
    metrics = _mean_over_processes(accelerator, metrics)
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _average(records: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over ``records``, ignoring NaN (a batch without implicit pairs)."""
    names = list(dict.fromkeys(name for record in records for name in record))
    averaged = {}
    for name in names:
        values = [r[name] for r in records if name in r and not math.isnan(r[name])]
        averaged[name] = sum(values) / len(values) if values else float("nan")
    return averaged


def _mean_over_processes(accelerator: Any, metrics: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1:
        return metrics
    names = sorted(metrics)
    values = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=accelerator.device)
    finite = torch.isfinite(values)
    sums = accelerator.reduce(torch.where(finite, values, torch.zeros_like(values)), reduction="sum")
    counts = accelerator.reduce(finite.double(), reduction="sum")
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
    return dict(zip(names, means.tolist()))


def _any_process(accelerator: Any, flag: bool) -> bool:
    """True when ``flag`` is set in any process, so every process stops at the same step."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step``, left by a run that stopped after its last checkpoint."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue  # a line cut short by a kill
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _linear_schedule(optimizer: Any, total_steps: int, warmup_ratio: float) -> Any:
    """Linear warmup to the peak rate, then linear decay to 0 at ``total_steps``."""
    warmup = int(math.ceil(warmup_ratio * total_steps))

    def factor(current: int) -> float:
        if current < warmup:
            return (current + 1) / (warmup + 1)
        return max(0.0, (total_steps - current) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _peft_model(accelerator: Any, policy: Any) -> Any:
    return accelerator.unwrap_model(policy).model


def _save_adapter(accelerator: Any, policy: Any, directory: Path) -> None:
    """Save the LoRA adapter in PEFT format (collective under FSDP, written by the main process)."""
    state = accelerator.get_state_dict(policy)
    if accelerator.is_main_process:
        # The wrapper's state dict keys start with "model."; peft expects the PeftModel's own keys.
        state = {key[len("model.") :]: value for key, value in state.items() if key.startswith("model.")}
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _peft_model(accelerator, policy).save_pretrained(str(tmp), state_dict=state)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)


def _save_checkpoint(output_dir, accelerator, policy, optimizer, scheduler, schedule, step, total_steps, config) -> Path:
    """Write ``checkpoint-<step>/`` atomically and keep the newest ``save_total_limit`` of them."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    _save_adapter(accelerator, policy, tmp / ADAPTER_DIR)
    # NOTE: under FSDP the optimizer state is sharded; this saves the main process's view only,
    # which is complete for DDP and single-process runs. FSDP resume is untested.
    if accelerator.is_main_process:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pth")
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        state = {
            "step": step,
            "total_steps": total_steps,
            "epoch": step / schedule.steps_per_epoch,
            "num_samples": schedule.num_samples,
            "global_batch": schedule.global_batch,
            "num_processes": schedule.num_processes,
            "seed": schedule.seed,
            "config": dataclasses.asdict(config),
        }
        _write_json_atomic(tmp / STATE_FILE, state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[: -config.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _load_checkpoint(checkpoint, accelerator, policy, optimizer, scheduler, schedule, total_steps) -> int:
    """Restore adapter, optimizer, scheduler and RNG state; returns the step to continue from."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    for name, expected in (("num_samples", schedule.num_samples), ("global_batch", schedule.global_batch),
                           ("seed", schedule.seed)):
        if state.get(name) != expected:
            raise HSCRError(
                f"cannot resume from {checkpoint}: it was saved with {name}={state.get(name)}, this run has "
                f"{name}={expected}; resume with the same data and settings, or start a new --output"
            )
    if state["step"] > total_steps:
        raise HSCRError(f"cannot resume from {checkpoint}: step {state['step']} is past total_steps={total_steps}")

    weights = load_file(str(checkpoint / ADAPTER_DIR / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(_peft_model(accelerator, policy), weights)
    if getattr(result, "unexpected_keys", None):
        raise HSCRError(f"checkpoint {checkpoint} does not match the model: unexpected keys {result.unexpected_keys[:3]}")
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=accelerator.device, weights_only=False))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
    rng_path = checkpoint / f"rng_state_{accelerator.process_index}.pth"
    if rng_path.is_file():
        _set_rng_state(torch.load(rng_path, weights_only=False))
    return int(state["step"])
