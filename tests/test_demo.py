"""The demo build: a small trained model, the demo datasets, reuse, and generation on the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch

from hscr.demo import ensure_demo
from hscr.demo.build import STORED_TRAIN_IMAGES
from hscr.demo.model import build_demo_model
from hscr.demo.recipe import DemoRecipe, read_manifest
from hscr.demo.phantoms import COUNT_WORDS

ROOT = Path(__file__).resolve().parents[1]

# A few hundred steps on a small pool: enough for the global cues, far from the full recipe.
SMALL = dict(train_images=200, validation_images=40, test_images=40, steps=250, max_steps=250, eval_every=250)
TINY = dict(train_images=30, validation_images=8, test_images=8, steps=12, max_steps=12, eval_every=12)


def _set_options(values: dict) -> list[str]:
    options = []
    for name, value in values.items():
        options += ["--set", f"{name}={value}"]
    return options


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "hscr", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("demo-data")
    result = ensure_demo(data_dir, progress=False, recipe=DemoRecipe(**SMALL))
    return data_dir, result


def _query(db_path: str, sql: str, params=()) -> list[tuple]:
    with duckdb.connect(db_path, read_only=True) as conn:
        return conn.execute(sql, list(params)).fetchall()


def test_tokenizer_normalizes_questions():
    _, processor = build_demo_model(DemoRecipe(**TINY))
    tokenizer = processor.tokenizer
    ids = tokenizer("[INST] <image>\nIs this an MRI? [/INST]")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<s>", "[INST]", "<image>", "is", "this", "an", "mri", "?", "[/INST]"]
    assert tokenizer.unk_token_id not in tokenizer("Where is the lesion located?")["input_ids"]


def test_recipe_key_and_validation():
    from hscr.errors import HSCRError

    base = DemoRecipe()
    assert base.key() == DemoRecipe().key()
    assert DemoRecipe(threads=2).key() == base.key()
    assert DemoRecipe(steps=10, max_steps=10).key() != base.key()
    with pytest.raises(HSCRError, match="max_steps"):
        DemoRecipe(steps=10, max_steps=5)
    with pytest.raises(HSCRError, match="patch_size"):
        DemoRecipe(patch_size=12)
    with pytest.raises(HSCRError, match="train_images"):
        DemoRecipe(train_images=0)


def test_dicom_header_questions():
    from hscr.demo.dicom_demo import header_questions, image_plane

    assert image_plane([1, 0, 0, 0, 1, 0]) == "axial"
    assert image_plane([1, 0, 0, 0, 0, -1]) == "coronal"
    assert image_plane([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert image_plane(None) is None
    qas = {qa.question: qa.answer for qa in header_questions("MR", "HEAD", None)}
    assert qas["What modality is this image?"] == "mri"
    assert qas["Is this an MRI?"] == "yes"
    assert qas["Is this a CT scan?"] == "no"
    assert qas["Which part of the body is this?"] == "head"
    assert "In which plane is this image?" not in qas
    assert header_questions(None, None, None) == []


@pytest.mark.slow
def test_build_writes_model_folder(built):
    data_dir, result = built
    model_dir = Path(result["model_dir"])
    assert model_dir == data_dir / "demo" / "model"
    assert result["model_source"] == "trained"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "demo_manifest.json"):
        assert (model_dir / name).is_file(), name
    assert not model_dir.with_name("model.partial").exists()
    manifest = read_manifest(model_dir)
    assert manifest["key"] == DemoRecipe(**SMALL).key()
    assert manifest["report"]["steps"] == SMALL["steps"]
    assert (model_dir / "model.safetensors").stat().st_size < 20 * 2**20


@pytest.mark.slow
def test_weights_stored_in_bf16(built):
    from safetensors import safe_open

    _, result = built
    with safe_open(str(Path(result["model_dir"]) / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_tensor(key).dtype for key in handle.keys()}
    assert dtypes == {torch.bfloat16}


@pytest.mark.slow
def test_model_loads_with_transformers(built):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    data_dir, result = built
    model = LlavaForConditionalGeneration.from_pretrained(result["model_dir"], dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(result["model_dir"])
    row = _query(result["db_path"], "SELECT i.path FROM samples s JOIN images i ON i.id = s.image_id "
                 "WHERE s.dataset = 'demo' AND s.split = 'test' ORDER BY s.id LIMIT 1")[0]
    image = Image.open(data_dir / row[0]).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What modality is this image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer in ("x-ray", "ct", "mri")


@pytest.mark.slow
def test_closed_answers_beat_majority(built):
    from hscr.decoding import greedy_generate
    from hscr.metrics import score_answer
    from hscr.models import load_vlm

    data_dir, result = built
    train_answers = [r[0] for r in _query(result["db_path"], "SELECT answer FROM samples WHERE dataset = 'demo' "
                                          "AND split = 'train' AND answer_type = 'closed'")]
    majority = max(set(train_answers), key=train_answers.count)
    test_rows = _query(result["db_path"], "SELECT i.path, s.question, s.answer FROM samples s JOIN images i "
                       "ON i.id = s.image_id WHERE s.dataset = 'demo' AND s.split = 'test' "
                       "AND s.answer_type = 'closed' ORDER BY s.id")
    vlm = load_vlm(result["model_dir"], device="cpu")
    predictions = greedy_generate(vlm, [data_dir / r[0] for r in test_rows], [r[1] for r in test_rows],
                                  max_new_tokens=4, batch_size=32)
    model_accuracy = sum(score_answer(p, r[2], "closed")["paper"] for p, r in zip(predictions, test_rows)) / len(test_rows)
    majority_accuracy = sum(r[2] == majority for r in test_rows) / len(test_rows)
    assert len(test_rows) >= 60
    assert model_accuracy > majority_accuracy + 0.05, (model_accuracy, majority_accuracy)


@pytest.mark.slow
def test_greedy_helper_matches_decoding(built):
    from hscr.decoding import greedy_generate_ids
    from hscr.demo.model import encode_set, greedy_answer_ids
    from hscr.demo.phantoms import generate_split, stored_questions
    from hscr.models import load_vlm

    _, result = built
    vlm = load_vlm(result["model_dir"], device="cpu")
    phantoms = generate_split("test", 4)
    data = encode_set(vlm, phantoms, stored_questions)
    ours = greedy_answer_ids(vlm, data, max_new_tokens=4)
    images = [phantoms[row].image() for row in data.image_rows]
    reference = greedy_generate_ids(vlm, images, [qa.question for qa in data.qas], max_new_tokens=4, batch_size=8)
    assert ours == reference


@pytest.mark.slow
def test_demo_dataset_rows(built):
    _, result = built
    db = result["db_path"]
    counts = dict(_query(db, "SELECT split, count(*) FROM samples WHERE dataset = 'demo' GROUP BY split"))
    assert counts == {"train": 6 * min(STORED_TRAIN_IMAGES, SMALL["train_images"]), "test": 6 * SMALL["test_images"]}
    types = {r[0] for r in _query(db, "SELECT DISTINCT answer_type FROM samples WHERE dataset = 'demo'")}
    assert types == {"open", "closed"}
    rows = _query(db, "SELECT s.answer, i.meta_json, i.path FROM samples s JOIN images i ON i.id = s.image_id "
                  "WHERE s.dataset = 'demo' AND s.question = 'How many lesions are there?'")
    assert rows
    for answer, meta_json, path in rows:
        assert answer == COUNT_WORDS[json.loads(meta_json)["count"]]
        assert (Path(db).parent / path).is_file()


@pytest.mark.slow
def test_dicom_dataset_from_headers(built):
    _, result = built
    db = result["db_path"]
    rows = _query(db, "SELECT s.question, s.answer, i.source_format FROM samples s JOIN images i ON i.id = s.image_id "
                  "WHERE s.dataset = 'demo-dicom' AND s.question = 'What modality is this image?'")
    assert sorted(r[1] for r in rows) == ["ct", "mri"]
    assert {r[2] for r in rows} == {"dicom"}
    planes = {r[0] for r in _query(db, "SELECT answer FROM samples WHERE dataset = 'demo-dicom' "
                                   "AND question = 'In which plane is this image?'")}
    assert planes == {"axial"}
    # Both files carry the patient name "CompressedSamples^..."; no stored text may contain it.
    for (text,) in _query(db, "SELECT meta_json FROM images UNION ALL SELECT meta_json FROM samples"):
        assert "CompressedSamples" not in (text or "")


@pytest.mark.slow
def test_second_run_reuses_everything(built):
    data_dir, result = built
    weights = Path(result["model_dir"]) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = ensure_demo(data_dir, progress=False, recipe=DemoRecipe(**SMALL))
    assert again["model_source"] == "existing"
    assert again["imported"] == {"demo": 0, "demo-dicom": 0}
    assert weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_command_second_run(built):
    data_dir, _ = built
    completed = _run(["demo", "--data-dir", str(data_dir), *_set_options(SMALL), "--json"])
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["model_source"] == "existing"
    assert "held-out" in completed.stdout


@pytest.mark.slow
def test_generate_on_demo_model(built):
    data_dir, result = built
    completed = _run(["generate", "--model", result["model_dir"], "--db", result["db_path"], "--dataset", "demo",
                      "--split", "test", "--limit", "6", "--json"])
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["processed"] == 6
    db = result["db_path"]
    done = _query(db, "SELECT count(*) FROM generation_done WHERE run_id = ?", [summary["run_id"]])[0][0]
    assert done == 6
    candidates = _query(db, "SELECT sample_id, rank, kept, similarity FROM candidates WHERE run_id = ? "
                        "ORDER BY sample_id, rank", [summary["run_id"]])
    assert len({c[0] for c in candidates}) == 6
    assert any(c[1] is not None and c[1] > 0 for c in candidates)
    scores = _query(db, "SELECT count(*) FROM token_scores WHERE run_id = ?", [summary["run_id"]])[0][0]
    assert scores > 0


@pytest.mark.slow
def test_prebuilt_copy_and_forced_rebuild(tmp_path, monkeypatch):
    import hscr.demo.build as build

    recipe = DemoRecipe(**TINY)
    first = ensure_demo(tmp_path / "a", progress=False, recipe=recipe, import_dicom=False)
    monkeypatch.setattr(build, "PREBUILT_DIR", Path(first["model_dir"]))

    copied = ensure_demo(tmp_path / "b", progress=False, recipe=recipe, import_dicom=False)
    assert copied["model_source"] == "prebuilt"
    assert read_manifest(copied["model_dir"]) == read_manifest(first["model_dir"])

    # --force trains from scratch again and must reproduce the committed weights bit for bit.
    rebuilt = ensure_demo(tmp_path / "b", progress=False, recipe=recipe, force=True, import_dicom=False)
    assert rebuilt["model_source"] == "trained"
    assert rebuilt["matches_prebuilt"] is True


@pytest.mark.slow
def test_other_recipe_not_taken_from_prebuilt(tmp_path, monkeypatch):
    import hscr.demo.build as build

    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    (prebuilt / "demo_manifest.json").write_text(json.dumps({"key": "another-recipe"}))
    monkeypatch.setattr(build, "PREBUILT_DIR", prebuilt)
    recipe = DemoRecipe(**TINY)
    assert recipe.key() != "another-recipe"
    source, _ = build._ensure_model(tmp_path / "model", recipe, force=False, progress=None)
    assert source == "trained"


def test_prebuilt_weights_match_recipe():
    # The committed weights are used only while their key equals the default recipe's. When the
    # phantoms, the templates or the trainer change, rebuild them with
    # `python -m hscr demo --force` and copy data/demo/model to hscr/demo/prebuilt.
    from hscr.demo.build import PREBUILT_DIR

    manifest = read_manifest(PREBUILT_DIR)
    assert manifest is not None
    assert manifest["key"] == DemoRecipe().key()
    report = manifest["report"]
    assert report["threshold_met"] is True
    assert report["test"]["closed"] > report["majority"]["per_question"]
    assert report["test_drop70"]["closed"] < report["test"]["closed"]
    assert (PREBUILT_DIR / "model.safetensors").stat().st_size < 20 * 2**20


def test_prebuilt_loads_and_answers():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from hscr.demo.build import PREBUILT_DIR
    from hscr.demo.phantoms import make_phantom

    model = LlavaForConditionalGeneration.from_pretrained(PREBUILT_DIR, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(PREBUILT_DIR)
    for index in range(6):
        phantom = make_phantom("test", index)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What modality is this image?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=phantom.image().convert("RGB"), text=prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert answer.strip() == phantom.modality, index
