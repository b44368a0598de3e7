"""Preference export in TRL, listwise and RLAIF-V formats, with reviews applied."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import random_image

from hscr.errors import HSCRError
from hscr.export import export
from hscr.models.tiny import TinySpec, build_processor, build_tokenizer
from hscr.reviews import record_review
from hscr.store import Store, candidate_key

ROOT = Path(__file__).resolve().parents[1]
RUN = "gen-1"


def png(seed):
    buffer = io.BytesIO()
    random_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def candidate(text, num_replaced, rank, similarity=None, kept=False, ref_logp=None):
    return {"text": text, "num_replaced": num_replaced, "rank": rank, "similarity": similarity, "kept": kept,
            "ref_logp": ref_logp, "replaced_positions": [], "replaced_tokens": []}


# sample key -> (image seed, question, answer, candidates)
SAMPLES = {
    "lesion": (0, "is there a lesion?", "yes there is a lesion in the left lung", [
        candidate("yes there is a lesion in the left lung", 0, 0, 1.0, True, -1.5),
        candidate("yes there is a lesion in the right lung", 1, 1, 0.9, True, -3.0),
        candidate("no there is a lesion in the right lung", 2, 2, 0.7, True, -5.0),
        candidate("no there is no lesion", 3, 3, 0.65, False, None),
    ]),
    "modality": (0, "what modality is this?", "x-ray", [
        candidate("x-ray", 0, 0, 1.0, True, -0.5),
        candidate("ct", 1, 1, 0.6, True, -2.0),
        candidate("mri", 1, 2, 0.4, True, -2.5),
    ]),
    "rejected": (1, "which organ?", "liver", [
        candidate("liver", 0, 0, 1.0, True, -1.0),
        candidate("kidney", 1, 1, 0.5, True, -2.0),
    ]),
    "acceptable": (1, "is the heart enlarged?", "no", [
        candidate("no", 0, 0, 1.0, True, -0.2),
        candidate("yes", 1, 1, 0.3, True, -1.2),
    ]),
}


@pytest.fixture
def store(tmp_path):
    db = Store(tmp_path / "data" / "hscr.duckdb")
    images = {seed: db.add_image(png(seed), 64, 64) for seed in (0, 1)}
    db.ensure_generation_run(RUN, "tiny-model", "{}")
    ids = {}
    for key, (seed, question, answer, cands) in SAMPLES.items():
        sample_id, _ = db.add_sample("phantoms", "train", images[seed], question, answer, "open")
        ids[key] = sample_id
        db.write_generation(RUN, [{"sample_id": sample_id, "flagged": False, "candidates": cands, "tokens": []}])

    def cid(key, text):
        return candidate_key(RUN, ids[key], text)

    record_review(db, "ana", ids["lesion"], "edit", payload={"text": "yes, a lesion in the left lung"})
    record_review(db, "ana", ids["lesion"], "edit", cid("lesion", "no there is a lesion in the right lung"),
                  {"text": "no lesion"})
    record_review(db, "ben", ids["lesion"], "edit", cid("lesion", "no there is a lesion in the right lung"),
                  {"text": "no lesion is visible"})
    record_review(db, "ben", ids["lesion"], "approve")
    record_review(db, "ana", ids["modality"], "acceptable", cid("modality", "mri"))
    record_review(db, "ana", ids["rejected"], "reject")
    record_review(db, "ana", ids["acceptable"], "acceptable", cid("acceptable", "yes"))
    db.ids = ids
    yield db
    db.close()


def load_hf(path):
    import datasets

    return datasets.load_dataset("parquet", data_files=str(path), split="train")


def test_trl_format_loads_with_datasets(store, tmp_path):
    summary = export(store, "trl", tmp_path / "trl.parquet")
    assert summary == {"format": "trl", "output": str(tmp_path / "trl.parquet"), "samples": 2, "rows": 3}

    ds = load_hf(tmp_path / "trl.parquet")
    assert sorted(ds.column_names) == ["chosen", "images", "prompt", "rejected"]
    assert ds.num_rows == 3
    rows = sorted(ds, key=lambda row: row["prompt"][0]["content"][1]["text"])   # rows follow sample ids
    first = rows[0]
    assert first["prompt"] == [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "is there a lesion?"}]}
    ]
    assert first["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "yes, a lesion in the left lung"}]}]
    assert [row["rejected"][0]["content"][0]["text"] for row in rows] == [
        "yes there is a lesion in the right lung", "no lesion is visible", "ct",
    ]
    assert [row["chosen"][0]["content"][0]["text"] for row in rows] == [
        "yes, a lesion in the left lung", "yes, a lesion in the left lung", "x-ray",
    ]
    assert [row["rejected"][0]["role"] for row in rows] == ["assistant"] * 3
    image = first["images"][0]
    assert image.size == (64, 64)
    assert list(image.convert("RGB").getdata()) == list(random_image(0).getdata())


def test_trl_messages_render_with_chat_template(store, tmp_path):
    export(store, "trl", tmp_path / "trl.parquet")
    row = next(r for r in load_hf(tmp_path / "trl.parquet") if r["chosen"][0]["content"][0]["text"] == "x-ray")
    spec = TinySpec()
    processor = build_processor(build_tokenizer(spec.tokenizer), spec)
    text = processor.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert text == "[INST] <image>\nwhat modality is this? [/INST] x-ray</s>"


def test_reviewed_only_keeps_approved(store, tmp_path):
    summary = export(store, "trl", tmp_path / "approved.parquet", reviewed_only=True)
    assert (summary["samples"], summary["rows"]) == (1, 2)


def test_listwise_columns_and_values(store, tmp_path):
    export(store, "listwise", tmp_path / "listwise.parquet")
    rows = pq.read_table(tmp_path / "listwise.parquet").to_pylist()
    assert [r["sample_id"] for r in rows] == sorted([store.ids["lesion"], store.ids["modality"]])
    by_question = {r["question"]: r for r in rows}
    lesion = by_question["is there a lesion?"]
    assert lesion["chosen"] == "yes, a lesion in the left lung"
    assert lesion["rejected"] == ["yes there is a lesion in the right lung", "no lesion is visible"]
    assert lesion["similarities"] == [0.9, 0.7]
    assert lesion["ref_chosen_logp"] is None            # edited, so the trainer recomputes it
    assert lesion["ref_rejected_logps"] == [-3.0, None]
    modality = by_question["what modality is this?"]
    assert modality["rejected"] == ["ct"]
    assert modality["ref_chosen_logp"] == -0.5
    assert modality["ref_rejected_logps"] == [-2.0]
    assert (modality["run_id"], modality["model"], modality["dataset"]) == (RUN, "tiny-model", "phantoms")
    assert modality["image"]["bytes"] == png(0)

    ds = load_hf(tmp_path / "listwise.parquet")
    assert ds[0]["image"].size == (64, 64)


def test_rlaif_v_rows(store, tmp_path):
    export(store, "rlaif-v", tmp_path / "rlaif.parquet")
    ds = load_hf(tmp_path / "rlaif.parquet")
    assert sorted(ds.column_names) == sorted(
        ["ds_name", "image", "question", "chosen", "rejected", "origin_dataset", "origin_split", "idx", "image_path"]
    )
    rows = {row["idx"]: row for row in ds}
    lesion, modality = store.ids["lesion"], store.ids["modality"]
    assert sorted(rows) == sorted([f"{lesion}-1", f"{lesion}-2", f"{modality}-1"])
    assert rows[f"{lesion}-1"]["rejected"] == "yes there is a lesion in the right lung"
    assert rows[f"{lesion}-2"]["rejected"] == "no lesion is visible"
    assert rows[f"{lesion}-2"]["chosen"] == "yes, a lesion in the left lung"
    assert rows[f"{modality}-1"]["rejected"] == "ct"
    assert rows[f"{modality}-1"]["chosen"] == "x-ray"
    assert rows[f"{modality}-1"]["question"] == "what modality is this?"
    assert ds["origin_dataset"] == ["phantoms"] * 3
    assert ds["origin_split"] == ["train"] * 3
    assert rows[f"{lesion}-1"]["image"].size == (64, 64)


def test_export_rejects_bad_requests(store, tmp_path):
    with pytest.raises(HSCRError, match="name the file \\*.parquet"):
        export(store, "trl", tmp_path / "out.jsonl")
    with pytest.raises(HSCRError, match="unknown export format 'dpo'"):
        export(store, "dpo", tmp_path / "out.parquet")
    with pytest.raises(HSCRError, match="no preference data .* drop --reviewed-only"):
        export(store, "trl", tmp_path / "out.parquet", reviewed_only=True, dataset="other")
    assert not (tmp_path / "out.parquet").exists()


def test_export_cli(store, tmp_path):
    db_path = store.db_path
    store.close()   # the command opens the file itself; closing twice is harmless
    output = tmp_path / "cli" / "pairs.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "hscr", "export", "--db", str(db_path), "--format", "rlaif-v", "--output", str(output),
         "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "format": "rlaif-v", "output": str(output), "samples": 2, "rows": 3,
    }
    assert pq.read_table(output).num_rows == 3
