"""The app's handlers, queries and figures against a real DuckDB file, without a browser."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from app import compare_tab, data_tab, plots, queries, review_tab, snapshots, train_tab
from app.main import make_parser, prepare_environment
from hscr.pixels import load_window_pixels, save_window_pixels, window_file
from app.state import AppContext, bind, user_name
from hscr.datasets import folder
from hscr.datasets.common import ImportOptions
from hscr.images import load_any, render_window
from hscr.store import Store, candidate_key
from support import write_image_folder

ALICE = SimpleNamespace(username="alice")
RUN = "gen-test"


def generation_result(sample_id: str, answer: str, wrong: list[tuple[str, float]]) -> dict:
    """A generation result for one sample: y_w plus dispreferred answers with similarities."""
    candidates = [{"text": answer, "num_replaced": 0, "similarity": 1.0, "rank": 0, "kept": True, "ref_logp": -1.0}]
    for rank, (text, similarity) in enumerate(wrong, start=1):
        candidates.append({"text": text, "num_replaced": rank, "replaced_positions": [0], "replaced_tokens": ["x"],
                           "similarity": similarity, "rank": rank, "kept": rank <= 2, "ref_logp": -2.0 * rank})
    tokens = [{"position": 0, "token": "x", "score": 0.5, "p_full": 0.5, "p_drop": 0.3, "coupled": True}]
    return {"sample_id": sample_id, "flagged": False, "model_answer": "model says " + answer,
            "candidates": candidates, "tokens": tokens}


@pytest.fixture
def context(tmp_path):
    rows = [
        {"image": "a.png", "question": "is there a lesion ?", "answer": "yes", "split": "train"},
        {"image": "b.png", "question": "where is the lesion ?", "answer": "left upper lobe", "split": "train"},
        {"image": "a.png", "question": "which organ ?", "answer": "the chest", "split": "test"},
    ]
    write_image_folder(tmp_path / "toy", rows, image_size=16)
    store = Store(tmp_path / "data" / "hscr.duckdb")
    report = folder.import_path(store, tmp_path / "toy", ImportOptions(name="toy"))
    assert report.imported == {"train": 2, "test": 1}
    samples = {s["question"]: s["id"] for s in store.samples()}
    store.ensure_generation_run(RUN, "tiny", "{}")
    store.write_generation(RUN, [
        generation_result(samples["where is the lesion ?"], "left upper lobe",
                          [("left lower lobe", 0.9), ("right lower lobe", 0.7), ("right lower zone", 0.4)]),
        generation_result(samples["is there a lesion ?"], "yes", [("no", 0.2)]),
    ])
    ctx = AppContext(store=store, model="unused", default_user="local-user")
    ctx.samples = samples
    yield ctx
    store.close()


def review_rows(ctx):
    return ctx.store.query('SELECT "user", action, candidate_id, payload_json FROM reviews ORDER BY id')


def test_counts_follow_latest_status(context):
    sample = context.samples["where is the lesion ?"]
    everything = queries.SampleFilter()
    assert queries.count_samples(context.store, everything) == {"pending": 3, "approved": 0, "rejected": 0, "total": 3}
    review_tab.approve(context, sample, "pending", 1, ALICE)
    review_tab.reject(context, sample, "pending", 1, ALICE)
    assert queries.count_samples(context.store, everything)["rejected"] == 1
    review_tab.reopen(context, sample, "pending", 1, ALICE)
    counts = queries.count_samples(context.store, everything)
    assert counts == {"pending": 3, "approved": 0, "rejected": 0, "total": 3}


def test_filters_and_paging(context):
    flt = queries.SampleFilter(dataset="toy", split="train")
    rows = queries.list_samples(context.store, flt, offset=0, limit=10)
    assert sorted(r["question"] for r in rows) == ["is there a lesion ?", "where is the lesion ?"]
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert queries.list_samples(context.store, flt, offset=1, limit=1)[0]["id"] == rows[1]["id"]
    closed = queries.SampleFilter(answer_type="closed")
    assert [r["question"] for r in queries.list_samples(context.store, closed)] == ["is there a lesion ?"]
    queue = queries.SampleFilter(generated_only=True)
    assert queries.count_samples(context.store, queue)["total"] == 2
    assert queries.filter_choices(context.store)["split"] == ["test", "train"]


def test_browse_handler_page_and_summary(context):
    table, summary, page = data_tab.browse(context, "toy", "(all)", "(all)", "(all)", "pending", 7)
    assert page == 1
    assert len(table) == 3
    assert summary.startswith("**3** samples match: 3 pending")


def test_review_actions_append_rows(context):
    sample = context.samples["where is the lesion ?"]
    state = review_tab.review_state(context.store, sample)
    rows = review_tab.dispreferred(context, sample, state)
    assert [r["current_text"] for r in rows] == ["left lower lobe", "right lower lobe", "right lower zone"]
    assert [r["training_rank"] for r in rows] == [1, 2, None]

    review_tab.save_chosen_edit(context, sample, "left upper lobe of the lung", ALICE)
    review_tab.save_candidate_edit(context, sample, rows[2]["id"], "right lower zone!", ALICE)
    review_tab.rerank(context, sample, "3, #1", ALICE)
    review_tab.toggle_acceptable(context, sample, rows[0]["id"], ALICE)
    note = review_tab.add_note(context, sample, "check the side", ALICE)
    assert note == ""

    recorded = review_rows(context)
    assert [r["action"] for r in recorded] == ["edit", "edit", "rerank", "acceptable", "note"]
    assert {r["user"] for r in recorded} == {"alice"}
    assert json.loads(recorded[0]["payload_json"]) == {"text": "left upper lobe of the lung"}
    assert recorded[0]["candidate_id"] is None
    assert json.loads(recorded[2]["payload_json"]) == {"order": [rows[2]["id"], rows[0]["id"]]}

    after = review_tab.dispreferred(context, sample, review_tab.review_state(context.store, sample))
    assert [r["training_rank"] for r in after] == [None, None, 1]
    assert after[0]["acceptable"]
    assert after[2]["current_text"] == "right lower zone!"

    review_tab.toggle_acceptable(context, sample, rows[0]["id"], ALICE)
    assert review_rows(context)[-1]["action"] == "restore"


@pytest.mark.parametrize("order, message", [("", "Invalid order"), ("1,x", "Invalid order"), ("4", "unknown: 4")])
def test_rerank_rejects_bad_order(context, order, message):
    sample = context.samples["where is the lesion ?"]
    with pytest.raises(gr.Error, match=message):
        review_tab.rerank(context, sample, order, ALICE)
    assert review_rows(context) == []


def test_review_view_progress_and_history(context):
    outputs = review_tab.review_view(context, "(all)", "pending", 1)
    sample_id, position, progress = outputs[:3]
    assert position == 1
    assert "Item **1 of 2**" in progress
    assert "**0 / 2** generated samples reviewed" in progress
    review_tab.approve(context, sample_id, "pending", 1, ALICE)
    outputs = review_tab.review_view(context, "(all)", "pending", 1)
    assert outputs[0] != sample_id
    assert "**1 / 2**" in outputs[2]
    history = review_tab.review_view(context, "(all)", "approved", 1)[9]
    assert list(history["action"]) == ["approve"]
    assert list(history["user"]) == ["alice"]


def test_status_moves_to_next_item(context):
    sample = context.samples["is there a lesion ?"]
    assert review_tab.approve(context, sample, "(all)", 1, ALICE) == 2
    assert review_tab.reject(context, sample, "pending", 1, ALICE) == 1


def test_user_name_with_and_without_login(context):
    assert user_name(context, None) == "local-user"
    assert user_name(context, ALICE) == "alice"
    context.auth_enabled = True
    with pytest.raises(gr.Error, match="not logged in"):
        user_name(context, SimpleNamespace(username=None))
    with pytest.raises(gr.Error, match="not logged in"):
        review_tab.save_chosen_edit(context, context.samples["is there a lesion ?"], "yes", None)


def test_bind_keeps_request_parameter(context):
    bound = bind(review_tab.add_note, context)
    assert list(__import__("inspect").signature(bound).parameters) == ["sample_id", "text", "request"]
    from gradio import utils

    assert utils.get_type_hints(bound)["request"] is gr.Request


def test_resolve_data_path_stays_inside(context):
    assert context.resolve_data_path("images/x.png") == (context.data_dir / "images" / "x.png").resolve()
    with pytest.raises(Exception, match="outside the data folder"):
        context.resolve_data_path("../../etc/passwd")


def test_tokens_html_marks_scores():
    tokens = [
        {"position": 0, "token": "\u2581left", "text": "left", "score": 1.2, "p_full": 0.6, "p_drop": 0.18, "coupled": True},
        {"position": 1, "token": "\u2581lobe", "text": " lobe", "score": -0.3, "p_full": 0.2, "p_drop": 0.27, "coupled": False},
        {"position": 2, "token": "<b>", "text": "<b>", "score": 0.0, "p_full": 0.9, "p_drop": 0.9, "coupled": False},
    ]
    page = plots.tokens_html(tokens, 0.7)
    assert page.count("<span class='hscr-token") == 3
    assert "class='hscr-token hscr-coupled'" in page
    assert "left<sup>1</sup>" in page
    assert "&lt;b&gt;" in page
    assert "coupling s = +1.200 nats" in page
    assert "p with 70% of image tokens removed = 0.1800" in page
    assert "data-limit='1.500'" in page
    assert plots.score_limit([0.2, -0.4]) == 1.0
    assert plots.score_limit([2.01]) == 2.5


def test_heatmap_overlay_colours():
    image = Image.new("RGB", (4, 4), (100, 100, 100))
    unchanged = plots.heatmap_overlay(image, np.zeros((2, 2)))
    assert np.array_equal(np.asarray(unchanged), np.asarray(image))
    grid = np.array([[1.0, 0.0], [0.0, -1.0]])
    pixels = np.asarray(plots.heatmap_overlay(image, grid, opacity=0.5)).astype(int)
    assert pixels[0, 0, 0] > 100      # red corner: more red
    assert pixels[0, 0, 2] < 100      # and less blue
    assert pixels[3, 3, 2] > 100      # blue corner: more blue
    assert pixels[3, 3, 0] < 100      # and less red


def test_zoom_and_display_size():
    image = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 10)
    zoomed = plots.zoom_image(image, 2.0, 0.0, 0.0)
    assert np.array_equal(np.asarray(zoomed)[::2, ::2], np.asarray(image)[:2, :2])
    assert plots.zoom_image(image, 1.0) is image
    assert plots.display_size(image, minimum=10).size == (12, 12)
    big = Image.new("L", (500, 20))
    assert plots.display_size(big) is big


def test_word_diff_marks_changes():
    marked = plots.word_diff_html("left upper lobe", "right upper <lobe>")
    assert marked == "<mark class='hscr-diff'>right</mark> upper <mark class='hscr-diff'>&lt;lobe&gt;</mark>"
    assert plots.word_diff_html("same words", "same words") == "same words"


def test_training_figure_traces():
    metrics = [{"step": 1, "loss": 2.0, "loss/explicit": 1.5, "loss/implicit": 0.5, "rewards/margins": 0.1,
                "rewards/accuracies": 0.5}, {"step": 2, "loss": 1.0, "rewards/margins": 0.3}]
    figure = plots.training_figure(metrics)
    by_name = {trace.name: list(trace.y) for trace in figure.data}
    assert by_name["loss"] == [2.0, 1.0]
    assert by_name["loss/explicit"] == [1.5]
    assert by_name["rewards/margins"] == [0.1, 0.3]
    assert "rewards/chosen" not in by_name


def test_dicom_window_pixels_round_trip(tmp_path):
    from pydicom.data import get_testdata_file

    loaded = load_any(get_testdata_file("CT_small.dcm"))
    assert loaded.pixels is not None
    png = tmp_path / "abc.png"
    loaded.image.save(png)
    saved = save_window_pixels(png, loaded)
    assert saved == window_file(png)
    back = load_window_pixels(png)
    assert np.array_equal(back.pixels, loaded.pixels)
    assert back.window_center == loaded.window_center
    lung = np.asarray(render_window(back, -600, 1500))
    assert np.array_equal(lung, np.asarray(render_window(loaded, -600, 1500)))
    assert load_window_pixels(tmp_path / "other.png") is None


def test_upload_dicom_keeps_window_pixels(context):
    from pydicom.data import get_testdata_file

    report = data_tab.upload_files(context, [get_testdata_file("CT_small.dcm")], "scans", "train",
                                   "is there a nodule ?", "no")
    assert "imported 1 samples" in report
    sample = context.store.samples(dataset="scans")[0]
    assert sample["modality"] == "CT"
    assert window_file(context.data_dir / sample["image_path"]).is_file()
    again = data_tab.upload_files(context, [get_testdata_file("CT_small.dcm")], "scans", "train",
                                  "is there a nodule ?", "no")
    assert "1 duplicates" in again


def test_upload_reports_bad_file(context, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    report = data_tab.upload_files(context, [str(bad)], "scans", "train", "q ?", "a")
    assert "imported 0 samples" in report
    assert "error: broken.png" in report
    with pytest.raises(gr.Error, match="question and the reference answer"):
        data_tab.upload_files(context, [str(bad)], "scans", "train", "", "")


def test_import_dataset_errors(context, tmp_path):
    with pytest.raises(gr.Error, match="not found"):
        data_tab.import_dataset(context, "folder", str(tmp_path / "missing"), "", "train")
    with pytest.raises(gr.Error, match="Unknown dataset format"):
        data_tab.import_dataset(context, "zip", str(tmp_path), "", "train")


def test_eval_snapshot_and_ingest(context):
    run_dir = context.runs_dir / "evaluate-1"
    db_path, count = snapshots.write_split_snapshot(context.store, run_dir, "toy", "train")
    assert count == 2
    assert (db_path.parent / "images").resolve() == context.store.image_dir.resolve()
    with Store(db_path) as snapshot:
        rows = snapshot.samples(dataset="toy", split="train")
        assert len(rows) == 2
        assert (snapshot.data_dir / rows[0]["image_path"]).is_file()
        snapshot.execute("INSERT INTO eval_runs (id, model, dataset, split, metrics_json) VALUES ('e1', 'm', 'toy', 'train', '{}')")
        for row in rows:
            snapshot.execute("INSERT INTO predictions (eval_run_id, sample_id, model, text, score_paper, score_strict) "
                             "VALUES ('e1', ?, 'm', 'yes', 1, 1)", [row["id"]])
    assert snapshots.ingest_evaluation(context.store, run_dir) == 2
    assert snapshots.ingest_evaluation(context.store, run_dir) == 0
    assert context.store.execute("SELECT count(*) FROM predictions").fetchone()[0] == 2
    with pytest.raises(Exception, match="no samples in split"):
        snapshots.write_split_snapshot(context.store, context.runs_dir / "evaluate-2", "toy", "validation")


def test_train_presets_and_form():
    values = train_tab.preset_values("smoke test (4 steps)")
    names = [f.name for f in train_tab.TRAIN_FIELDS]
    assert values[names.index("max_steps")] == 4
    assert values[names.index("gamma")] == 0.1
    config = train_tab._config_from_form(tuple(values))
    assert config.max_steps == 4
    bad = list(values)
    bad[names.index("gamma")] = -1
    with pytest.raises(gr.Error, match="gamma"):
        train_tab._config_from_form(tuple(bad))


def test_training_refuses_busy_gpu(context):
    from hscr import jobs

    run_dir = context.runs_dir / "train-busy"
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({
        "id": "train-busy", "kind": "train", "args": ["--device", "cuda"], "state": "running",
        "pid": os.getpid(), "created_at": "2026-01-01T00:00:00+00:00", "progress": {},
    }))
    assert jobs.status("train-busy", context.runs_dir)["state"] == "running"
    values = train_tab.preset_values("smoke test (4 steps)")
    with pytest.raises(gr.Error, match="The GPU is busy with job train-busy"):
        train_tab.start_training(context, "(all)", "train", False, "cuda", *values)


def test_training_without_data_explains(context):
    values = train_tab.preset_values("smoke test (4 steps)")
    with pytest.raises(gr.Error, match="No preference data matches"):
        train_tab.start_training(context, "(all)", "validation", False, "cpu", *values)
    assert not context.runs_dir.exists() or not any(context.runs_dir.iterdir())


def test_read_metrics_skips_partial_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert [m["step"] for m in train_tab.read_metrics(tmp_path)] == [1, 2]
    assert train_tab.read_metrics(tmp_path / "none") == []


def test_compare_adapters_lists_base(context):
    assert compare_tab.adapters(context) == [(compare_tab.BASE_MODEL, "")]


def test_cli_defaults_are_private(tmp_path, monkeypatch):
    args = make_parser().parse_args([])
    assert args.host == "127.0.0.1"
    assert args.share is False
    assert args.auth is None
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    prepare_environment(tmp_path / "data")
    assert Path(os.environ["GRADIO_TEMP_DIR"]).is_relative_to((tmp_path / "data").resolve())
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_inspect_dicom_window_controls(context):
    from pydicom.data import get_testdata_file

    from app import inspect_tab

    path = get_testdata_file("CT_small.dcm")
    data_tab.upload_files(context, [path], "scans", "train", "is there a nodule ?", "no")
    sample_id = context.store.samples(dataset="scans")[0]["id"]
    loaded = load_any(path)

    header, question, answer, _, group, preset, center, width = inspect_tab.load_sample(context, sample_id)
    assert question == "is there a nodule ?"
    assert answer == "no"
    assert group["visible"] is True
    assert center["value"] == loaded.window_center
    assert width["value"] == loaded.window_width
    assert inspect_tab.apply_preset(context, sample_id, "lung")[0]["value"] == -600.0

    shown = inspect_tab.render_image(context, sample_id, "lung", -600, 1500, False, 1, 0.5, 0.5)
    expected = plots.display_size(render_window(loaded, -600, 1500).convert("RGB"))
    assert np.array_equal(np.asarray(shown), np.asarray(expected))
    inverted = inspect_tab.render_image(context, sample_id, "lung", -600, 1500, True, 1, 0.5, 0.5)
    assert np.array_equal(np.asarray(inverted), 255 - np.asarray(expected))


def test_inspect_png_has_no_window(context):
    from app import inspect_tab

    outputs = inspect_tab.load_sample(context, context.samples["which organ ?"])
    assert outputs[4]["visible"] is False
    assert "window/level unavailable" not in outputs[0]
    with pytest.raises(gr.Error, match="not found"):
        inspect_tab.load_sample(context, "missing-id")


def test_display_text_keeps_word_spaces():
    from app.inspect_tab import with_display_text
    from support import tiny_vlm

    vlm = tiny_vlm(image_size=16, patch_size=8)
    ids = vlm.adapter.answer_ids("the chest shows a round nodule")
    tokens = [{"token": t} for t in vlm.tokenizer.convert_ids_to_tokens(ids)]
    pieces = [t["text"] for t in with_display_text(vlm.tokenizer, tokens)]
    assert "".join(pieces) == "the chest shows a round nodule</s>"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-upload-mb", "0"], "error: invalid --max-upload-mb 0"),
        (["--auth", "missing-users.json", "--model", "unused"], "error: users file not found"),
    ],
)
def test_cli_rejects_bad_options(tmp_path, extra, message):
    import subprocess
    import sys

    from browser import REPO

    result = subprocess.run(
        [sys.executable, str(REPO / "app.py"), "--db", str(tmp_path / "data" / "hscr.duckdb"), *extra],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_generation_ingest_copies_results(context):
    run_dir = context.runs_dir / "generate-1"
    db_path, count = snapshots.write_split_snapshot(context.store, run_dir, "toy", "test")
    assert count == 1
    sample_id = context.samples["which organ ?"]
    with Store(db_path) as snapshot:
        snapshot.ensure_generation_run("gen-new", "tiny", "{}")
        snapshot.write_generation("gen-new", [generation_result(sample_id, "the chest", [("the heart", 0.6)])])
    assert snapshots.ingest_generation(context.store, run_dir) == 1
    assert snapshots.ingest_generation(context.store, run_dir) == 0
    texts = [c["text"] for c in context.store.candidates_for(sample_id)]
    assert texts == ["the chest", "the heart"]
    assert len(context.store.token_scores_for(sample_id, "gen-new")) == 1
    queue = queries.SampleFilter(generated_only=True)
    assert queries.count_samples(context.store, queue)["total"] == 3


def test_start_generation_rejects_bad_input(context):
    with pytest.raises(gr.Error, match="Choose the dataset"):
        review_tab.start_generation(context, "(all)", "train", 0, 0.7, 0.9)
    with pytest.raises(gr.Error, match="dropout_ratio"):
        review_tab.start_generation(context, "toy", "train", 0, 1.5, 0.9)
    with pytest.raises(gr.Error, match="no samples in split"):
        review_tab.start_generation(context, "toy", "validation", 0, 0.7, 0.9)


@pytest.mark.slow
def test_generation_job_fills_queue(context, tmp_path):
    from hscr import jobs
    from support import save_tiny_model

    context.model = str(save_tiny_model(tmp_path / "model", image_size=16, patch_size=8))
    message = review_tab.start_generation(context, "toy", "test", 0, 0.7, 0.9)
    job_id = message.split("**")[1]
    info = jobs.wait(job_id, context.runs_dir, timeout_s=300)
    assert info["state"] == "succeeded", info["log_tail"]
    outputs = review_tab.poll_generation(context, "(all)", "(all)", 1)
    assert "succeeded" in outputs[0]
    assert "of 3" in outputs[3]  # the queue grew from 2 to 3 generated samples
    sample_id = context.samples["which organ ?"]
    assert context.store.candidates_for(sample_id)[0]["text"] == "the chest"
