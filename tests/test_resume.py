"""Checkpoints on SIGTERM and every N steps; a resumed run ends where an uninterrupted one does."""

import json
import os
import signal

import pytest
import torch

from hscr.config import TrainConfig
from hscr.errors import HSCRError
from hscr.trainer import latest_checkpoint, list_checkpoints, train
from support import tiny_vlm
from train_support import make_rows


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def config(**fields):
    # LoRA dropout stays on: the resumed run must restore the RNG state to match.
    values = dict(max_steps=6, batch_size=2, learning_rate=5e-3, lora_r=4, lora_alpha=8, lora_dropout=0.1,
                  save_steps=100, warmup_ratio=0.2)
    values.update(fields)
    return TrainConfig(**values)


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def metric_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_weights(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst <= tol


def test_sigterm_checkpoint_then_resume_matches_uninterrupted(tmp_path):
    rows = make_rows(tmp_path / "images", count=5)

    full_vlm = tiny_vlm()
    full = train(full_vlm, rows, config(), tmp_path / "full")
    assert full.status == "completed"

    def send_sigterm(info):
        if info.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    previous_handler = signal.getsignal(signal.SIGTERM)
    first = train(tiny_vlm(), rows, config(), tmp_path / "cut", on_step=send_sigterm)
    assert signal.getsignal(signal.SIGTERM) is previous_handler  # the handler is restored
    assert first.status == "interrupted"
    assert first.step == 3
    assert first.adapter_dir is None
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint-3"

    resumed_vlm = tiny_vlm()
    second = train(resumed_vlm, rows, config(), tmp_path / "cut", resume=True)
    assert second.status == "completed"
    assert second.step == 6

    assert_same_weights(lora_weights(full_vlm.model), lora_weights(resumed_vlm.model))
    full_losses = [m["loss"] for m in metric_lines(tmp_path / "full" / "metrics.jsonl")]
    cut_losses = [m["loss"] for m in metric_lines(tmp_path / "cut" / "metrics.jsonl")]
    assert cut_losses == pytest.approx(full_losses, abs=1e-6)


def test_periodic_checkpoints_keep_the_newest(tmp_path):
    rows = make_rows(tmp_path / "images", count=4)
    train(tiny_vlm(), rows, config(save_steps=2, save_total_limit=2), tmp_path / "run")
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert (tmp_path / "run" / "checkpoint-4" / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_from_periodic_checkpoint_after_lost_steps(tmp_path):
    # A run killed after step 5 left checkpoint-4 and metric lines up to step 5.
    rows = make_rows(tmp_path / "images", count=4)
    full_vlm = tiny_vlm()
    train(full_vlm, rows, config(), tmp_path / "full")

    train(tiny_vlm(), rows, config(max_steps=4, save_steps=4), tmp_path / "cut")
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
        handle.write('{"step": 6, "lo')   # cut short by the kill
    (tmp_path / "cut" / "adapter").rename(tmp_path / "cut" / "adapter-old")

    resumed_vlm = tiny_vlm()
    result = train(resumed_vlm, rows, config(), tmp_path / "cut", resume=True)

    assert result.step == 6
    # max_steps changed from 4 to 6, so the learning-rate schedule differs: only check that the
    # run continued from step 4 and the metric log has each step once.
    steps = [m["step"] for m in metric_lines(tmp_path / "cut" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_other_data_is_rejected(tmp_path):
    rows = make_rows(tmp_path / "images", count=4)
    train(tiny_vlm(), rows, config(max_steps=2, save_steps=2), tmp_path / "run")
    (tmp_path / "run" / "adapter").rename(tmp_path / "run" / "adapter-old")
    with pytest.raises(HSCRError, match="num_samples"):
        train(tiny_vlm(), rows[:3], config(max_steps=4), tmp_path / "run", resume=True)
