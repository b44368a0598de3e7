"""Two CPU processes (gloo on 127.0.0.1) train to the same adapter as one process on the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hscr.preferences import write_preferences_parquet
from support import save_tiny_model
from train_support import make_rows

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_train(launcher: list[str], model_dir, data, output, batch_size: int):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "GLOO_SOCKET_IFNAME": "lo",      # keep gloo's connections on the loopback interface
        "MASTER_ADDR": "127.0.0.1",
    }
    settings = ["max_steps=3", f"batch_size={batch_size}", "lora_r=4", "lora_dropout=0.0",
                "learning_rate=0.005", "warmup_ratio=0.0"]
    command = launcher + [
        "train", "--model", str(model_dir), "--data", str(data), "--output", str(output), "--device", "cpu",
    ]
    for item in settings:
        command += ["--set", item]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(output / "adapter" / "adapter_model.safetensors")), done.stderr


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_preferences_parquet(make_rows(tmp_path / "images", count=6), tmp_path / "prefs.parquet")

    single, single_log = run_train([sys.executable, "-m", "hscr"], model_dir, data, tmp_path / "one", batch_size=4)
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "-m", "hscr",
    ]
    double, double_log = run_train(launch, model_dir, data, tmp_path / "two", batch_size=2)

    assert "global batch 4 over 1 processes" in single_log
    assert "global batch 4 over 2 processes" in double_log

    assert single.keys() == double.keys()
    assert len(single) > 0
    worst = max((single[k] - double[k]).abs().max().item() for k in single)
    assert worst <= 1e-5
    # Training moved the adapter, so the equality is not two untouched initialisations.
    assert max(v.abs().max().item() for k, v in single.items() if "lora_B" in k) > 0

    one_metrics = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two_metrics = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in two_metrics] == pytest.approx([m["loss"] for m in one_metrics], abs=1e-5)
    assert [m["step"] for m in two_metrics] == [1, 2, 3]
