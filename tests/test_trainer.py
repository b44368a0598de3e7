"""MLPO training in TRL's manner: loss logged, LoRA weights moved, base weights unchanged."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hscr.config import TrainConfig
from hscr.errors import DataError, HSCRError
from hscr.packing import repeated_logps
from hscr.preferences import write_preferences_parquet
from hscr.sequences import encode_images
from hscr.trainer import Schedule, apply_lora, language_model_target_regex, load_images, train
from support import save_tiny_model, tiny_vlm
from train_support import make_rows

METRIC_NAMES = {
    "loss", "loss/explicit", "loss/implicit", "rewards/chosen", "rewards/rejected", "rewards/margins",
    "rewards/accuracies", "rewards/implicit_accuracies", "lr", "samples_per_second", "step", "epoch",
}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_config(**fields):
    values = dict(max_steps=3, batch_size=2, learning_rate=5e-3, lora_r=4, lora_alpha=8, save_steps=100, warmup_ratio=0.0)
    values.update(fields)
    return TrainConfig(**values)


def read_metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_lora_only_on_language_model():
    vlm = tiny_vlm()
    peft_model = apply_lora(vlm.model, TrainConfig(lora_r=4))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("language_model" in n and "lora_" in n for n in trainable)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in trainable)
    # The CLIP tower has q_proj/v_proj too; none of them got an adapter.
    assert not any("lora" in n for n, _ in peft_model.named_modules() if "vision_tower" in n)


def test_target_regex_rejects_empty_names():
    with pytest.raises(HSCRError, match="lora_target_modules"):
        language_model_target_regex(" , ")


def test_train_logs_moves_lora_keeps_base(tmp_path):
    vlm = tiny_vlm()
    base_before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    rows = make_rows(tmp_path / "images")

    result = train(vlm, rows, small_config(), tmp_path / "run")

    assert result.status == "completed"
    assert result.step == 3
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert METRIC_NAMES <= set(metrics[0])
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[0]["loss"] == pytest.approx(metrics[0]["loss/explicit"] + metrics[0]["loss/implicit"], rel=1e-5)

    peft_model = vlm.model
    moved = [n for n, p in peft_model.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert moved, "LoRA B weights start at zero and must have moved"
    for name, param in peft_model.get_base_model().named_parameters():
        clean = name.replace(".base_layer", "")
        if "lora_" in name:
            continue
        assert torch.equal(param, base_before[clean]), f"base weight {clean} changed"


def test_first_step_loss_is_log2_per_pair(tmp_path):
    # All reference log-probs unknown: the trainer computes them with the model before LoRA. LoRA B
    # starts at zero, so at step 1 the policy equals the reference and every pair costs log 2.
    vlm = tiny_vlm()
    rows = make_rows(tmp_path / "images", count=2)
    config = small_config(max_steps=1, batch_size=2, num_dispreferred=3)

    train(vlm, rows, config, tmp_path / "run")

    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    # rows: 3 rejected (3 explicit + 3 implicit pairs) and 3 rejected again, averaged over 2 samples
    assert first["loss"] == pytest.approx(6 * math.log(2.0), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)


def test_reference_logps_match_base_model(tmp_path):
    rows = make_rows(tmp_path / "images", count=2)
    rows[1].ref_chosen_logp = -7.5  # a known value stays as it is
    vlm = tiny_vlm()
    base = tiny_vlm()

    train(vlm, rows, small_config(max_steps=1), tmp_path / "run")

    computed = json.loads((tmp_path / "run" / "reference_logps.json").read_text())
    adapter = base.adapter
    with torch.no_grad():
        features = encode_images(adapter, base.model, load_images([rows[0].image_path]))
        prompt = adapter.prompt_ids([adapter.prompt(rows[0].question)], features.shape[1])
        answers = [[adapter.answer_ids(t) for t in [rows[0].chosen] + rows[0].rejected]]
        expected = repeated_logps(adapter, base.model, prompt, answers, features, [0])[0]
    assert computed["s0"] == pytest.approx(expected.tolist(), abs=1e-4)


def test_adapter_loads_with_peft(tmp_path):
    from peft import PeftModel

    vlm = tiny_vlm()
    rows = make_rows(tmp_path / "images", count=4)
    result = train(vlm, rows, small_config(max_steps=2), tmp_path / "run")

    assert (result.adapter_dir / "adapter_config.json").is_file()
    fresh = tiny_vlm()
    loaded = PeftModel.from_pretrained(fresh.model, str(result.adapter_dir))
    trained = {n: p for n, p in vlm.model.named_parameters() if "lora_" in n}
    restored = dict(loaded.named_parameters())
    assert trained
    for name, param in trained.items():
        assert torch.equal(param.detach(), restored[name].detach()), name


def test_gradient_checkpointing_gives_same_run(tmp_path):
    rows = make_rows(tmp_path / "images", count=4)
    plain = train(tiny_vlm(), rows, small_config(max_steps=2, lora_dropout=0.0), tmp_path / "plain")
    checkpointed = train(
        tiny_vlm(), rows, small_config(max_steps=2, lora_dropout=0.0, gradient_checkpointing=True), tmp_path / "gc"
    )
    a = read_metrics(plain.output_dir / "metrics.jsonl")
    b = read_metrics(checkpointed.output_dir / "metrics.jsonl")
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=1e-4)


def test_existing_run_needs_resume(tmp_path):
    rows = make_rows(tmp_path / "images", count=2)
    train(tiny_vlm(), rows, small_config(max_steps=1), tmp_path / "run")
    with pytest.raises(HSCRError, match="--resume"):
        train(tiny_vlm(), rows, small_config(max_steps=1), tmp_path / "run")


def test_missing_image_is_reported(tmp_path):
    rows = make_rows(tmp_path / "images", count=2)
    rows[1].image_path = str(tmp_path / "gone.png")
    with pytest.raises(DataError, match="gone.png"):
        train(tiny_vlm(), rows, small_config(max_steps=2), tmp_path / "run")


def test_schedule_same_global_batches_for_any_process_count():
    one = Schedule(num_samples=7, batch_size=4, grad_accum_steps=1, num_processes=1, seed=3)
    two = Schedule(num_samples=7, batch_size=2, grad_accum_steps=1, num_processes=2, seed=3)
    accum = Schedule(num_samples=7, batch_size=1, grad_accum_steps=2, num_processes=2, seed=3)
    for step in range(5):
        expected = one.micro_batch(step, 0, 0)
        assert two.micro_batch(step, 0, 0) + two.micro_batch(step, 0, 1) == expected
        pieces = [accum.micro_batch(step, m, p) for m in range(2) for p in range(2)]
        assert sum(pieces, []) == expected
    # Each epoch visits every sample; the short last batch is filled from the epoch's start.
    assert sorted(set(one.step_indices(0) + one.step_indices(1))) == list(range(7))
    assert one.step_indices(2) != one.step_indices(0)  # a new epoch has a new order


@pytest.mark.slow
def test_train_command_from_parquet(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    rows = make_rows(tmp_path / "images", count=4)
    data = write_preferences_parquet(rows, tmp_path / "prefs.parquet")
    config = tmp_path / "train.yaml"
    config.write_text("train:\n  max_steps: 2\n  batch_size: 2\n  lora_r: 4\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}

    done = subprocess.run(
        [sys.executable, "-m", "hscr", "train", "--model", str(model_dir), "--data", str(data),
         "--output", str(tmp_path / "run"), "--config", str(config), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert "adapter saved to" in done.stdout
    assert (tmp_path / "run" / "preferences.parquet").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2


def test_train_command_rejects_missing_data(tmp_path, cli):
    code, out, err = cli("train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "missing.parquet"),
                         "--output", str(tmp_path / "run"), "--device", "cpu")
    assert code == 2
    assert "error: preference file not found" in err
    assert "missing.parquet" in err


@pytest.fixture()
def cli(capsys):
    from hscr.__main__ import main

    def run(*args):
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_train_command_from_database(tmp_path, folder_dataset, tiny_model_dir, cli):
    from hscr.config import GenerateConfig
    from hscr.datasets.common import ImportOptions
    from hscr.datasets.folder import import_path
    from hscr.generate import run_generation
    from hscr.models import load_vlm
    from hscr.preferences import load_preferences, read_preferences_parquet
    from hscr.store import Store

    db_path = tmp_path / "data" / "hscr.duckdb"
    with Store(db_path) as store:
        import_path(store, folder_dataset, ImportOptions(name="toy"))
        run_generation(load_vlm(tiny_model_dir, device="cpu"), store, GenerateConfig(batch_size=4), progress=False)
        expected = load_preferences(store, split="train")
    assert expected, "generation produced no preference rows"

    code, out, err = cli("train", "--model", str(tiny_model_dir), "--db", str(db_path), "--output",
                         str(tmp_path / "run"), "--device", "cpu", "--set", "max_steps=1", "--set", "batch_size=4",
                         "--set", "lora_r=4")

    assert code == 0, err
    snapshot = read_preferences_parquet(tmp_path / "run" / "preferences.parquet")
    assert [r.sample_id for r in snapshot] == [r.sample_id for r in expected]
    # The stored reference log-probs come from generation; with LoRA B at zero the policy equals
    # that reference at step 1 only if both tokenize and score the answers the same way.
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
