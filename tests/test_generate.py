import json
import subprocess
import sys

import pytest

from hscr.config import GenerateConfig
from hscr.datasets.common import ImportOptions
from hscr.datasets.folder import import_path
from hscr.generate import analyze_sample, run_generation
from hscr.models import load_vlm
from hscr.preferences import load_preferences
from hscr.store import Store
from support import random_image


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hscr", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


class InProcessResult:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture()
def cli(capsys):
    """Run ``python -m hscr`` in this process (same parser and error handling, no start-up cost)."""
    from hscr.__main__ import main

    def run(*args):
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return InProcessResult(code, out.out, out.err)

    return run


@pytest.fixture()
def store(tmp_path, folder_dataset):
    with Store(tmp_path / "data" / "hscr.duckdb") as db:
        report = import_path(db, folder_dataset, ImportOptions(name="toy"))
        assert report.imported == {"train": 4}
        yield db


def test_generation_stores_ranked_candidates(store, tiny_model_dir):
    vlm = load_vlm(tiny_model_dir, device="cpu")
    config = GenerateConfig(batch_size=3)
    summary = run_generation(vlm, store, config, dataset="toy", progress=False)
    assert summary["processed"] == 4
    assert summary["errors"] == []
    rows = store.query("SELECT * FROM candidates WHERE run_id = ? ORDER BY sample_id, rank", [summary["run_id"]])
    by_sample = {}
    for row in rows:
        by_sample.setdefault(row["sample_id"], []).append(row)
    assert len(by_sample) == 4
    for sample_id, cands in by_sample.items():
        preferred = [c for c in cands if c["num_replaced"] == 0]
        assert len(preferred) == 1
        assert preferred[0]["rank"] == 0
        assert preferred[0]["ref_logp"] < 0
        others = [c for c in cands if c["num_replaced"] > 0]
        sims = [c["similarity"] for c in sorted(others, key=lambda c: c["rank"])]
        assert sims == sorted(sims, reverse=True)
        assert len({c["text"] for c in cands}) == len(cands)
        kept = [c for c in others if c["kept"]]
        assert len(kept) <= config.num_dispreferred
        assert all(c["ref_logp"] is not None and c["ref_logp"] < 0 for c in kept)
        assert all(c["ref_logp"] is None for c in others if not c["kept"])
        tokens = store.token_scores_for(sample_id, summary["run_id"])
        assert tokens and all(0.0 <= t["p_full"] <= 1.0 and 0.0 <= t["p_drop"] <= 1.0 for t in tokens)
    # A second run with the same settings finds every sample done.
    again = run_generation(vlm, store, GenerateConfig(batch_size=2), dataset="toy", progress=False)
    assert again["processed"] == 0
    assert again["skipped"] == 4
    assert store.execute("SELECT count(*) FROM candidates").fetchone()[0] == len(rows)
    # The stored reference log-prob of y_w matches a fresh teacher-forced pass.
    prefs = load_preferences(store)
    assert {p.sample_id for p in prefs} <= set(by_sample)


def test_batched_equals_one_at_a_time(store, tiny_model_dir):
    vlm = load_vlm(tiny_model_dir, device="cpu")
    batched = run_generation(vlm, store, GenerateConfig(batch_size=4), progress=False)
    rows_batched = store.query(
        "SELECT sample_id, text, rank, kept, ref_logp FROM candidates WHERE run_id = ? ORDER BY sample_id, text",
        [batched["run_id"]],
    )
    single = []
    from hscr.generate import GenerationSample, process_batch
    from hscr.images import open_stored

    for sample in store.samples():
        item = GenerationSample(sample["id"], open_stored(store.data_dir / sample["image_path"]), sample["image_id"],
                                sample["question"], sample["answer"])
        for cand in process_batch(vlm, [item], GenerateConfig(batch_size=1))[0]["candidates"]:
            single.append((sample["id"], cand["text"], cand["rank"], cand["kept"], cand["ref_logp"]))
    single.sort(key=lambda r: (r[0], r[1]))
    assert [(r["sample_id"], r["text"], r["rank"], r["kept"]) for r in rows_batched] == [r[:4] for r in single]
    for row, expected in zip(rows_batched, single):
        if expected[4] is None:
            assert row["ref_logp"] is None
        else:
            assert row["ref_logp"] == pytest.approx(expected[4], abs=1e-4)


def test_analyze_sample_reports_tokens(tiny_model_dir):
    vlm = load_vlm(tiny_model_dir, device="cpu")
    result = analyze_sample(vlm, random_image(1), "which organ is shown ?", "the left lung")
    tokens = result["tokens"]
    assert tokens[-1]["token"] == "</s>"
    assert tokens[-1]["coupled"] is False
    assert any(t["coupled"] for t in tokens)
    assert result["candidates"][0]["num_replaced"] == 0


def test_cli_generate_end_to_end(tmp_path, folder_dataset, tiny_model_dir):
    db = tmp_path / "cli.duckdb"
    imported = run_cli("import", "folder", str(folder_dataset), "--db", str(db), "--name", "toy", "--json")
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout.strip().splitlines()[-1])["imported"] == {"train": 4}
    result = run_cli("generate", "--model", str(tiny_model_dir), "--db", str(db), "--dataset", "toy",
                     "--limit", "3", "--json", "--set", "batch_size=2")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["processed"] == 3
    with Store(db, read_only=True) as store:
        assert store.execute("SELECT count(*) FROM generation_done").fetchone()[0] == 3


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "no-such-org/no-such-model"], "not found"),
        (["--model", "MODEL", "--set", "beta=abc"], "invalid beta"),
        (["--model", "MODEL", "--set", "dropout_ratio=1.5"], "invalid dropout_ratio"),
        (["--model", "MODEL", "--dataset", "nope"], "dataset 'nope' has no samples"),
    ],
)
def test_cli_generate_bad_input(tmp_path, folder_dataset, tiny_model_dir, cli, args, fragment):
    db = tmp_path / "bad.duckdb"
    assert cli("import", "folder", str(folder_dataset), "--db", str(db)).returncode == 0
    args = [str(tiny_model_dir) if a == "MODEL" else a for a in args]
    result = cli("generate", "--db", str(db), *args)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:")


def test_cli_model_without_image_token(tmp_path, folder_dataset, tiny_model_dir, cli):
    import shutil

    broken = tmp_path / "no-image-token"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["image_token_index"] = 99999
    config.pop("image_token_id", None)
    (broken / "config.json").write_text(json.dumps(config))
    db = tmp_path / "x.duckdb"
    assert cli("import", "folder", str(folder_dataset), "--db", str(db)).returncode == 0
    result = cli("generate", "--model", str(broken), "--db", str(db))
    assert result.returncode == 2
    assert "image token" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unreadable_image_loses_nothing(tmp_path, folder_dataset, tiny_model_dir, cli):
    db = tmp_path / "x.duckdb"
    assert cli("import", "folder", str(folder_dataset), "--db", str(db), "--name", "toy").returncode == 0
    with Store(db) as store:
        victim = store.samples()[0]
        path = store.data_dir / victim["image_path"]
    path.write_bytes(b"not a png")
    result = cli("generate", "--model", str(tiny_model_dir), "--db", str(db), "--json")
    assert result.returncode == 1
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # b.png is shared by two samples; only the samples of the broken image fail.
    assert summary["processed"] + len(summary["errors"]) == 4
    assert summary["processed"] >= 2
    assert any(victim["id"] in e for e in summary["errors"])
    assert "Traceback" not in result.stderr
