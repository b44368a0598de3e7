import pytest

from hscr.errors import HSCRError
from hscr.preferences import load_preferences, read_preferences_parquet, write_preferences_parquet
from hscr.reviews import record_review, review_state
from hscr.store import Store, candidate_key
from support import random_image


def png_bytes(seed):
    import io

    buffer = io.BytesIO()
    random_image(seed, 8).save(buffer, format="PNG")
    return buffer.getvalue()


def result(sample_id, texts, kept=None):
    kept = kept or [True] * len(texts)
    cands = [{"text": "the left lung", "num_replaced": 0, "similarity": 1.0, "rank": 0, "kept": True, "ref_logp": -1.5}]
    for index, (text, flag) in enumerate(zip(texts, kept), start=1):
        cands.append({"text": text, "num_replaced": index, "replaced_positions": [index], "replaced_tokens": ["▁x"],
                      "similarity": 1.0 - 0.2 * index, "rank": index, "kept": flag, "ref_logp": -2.0 - index if flag else None})
    tokens = [{"position": 0, "token": "▁the", "score": 0.1, "p_full": 0.5, "p_drop": 0.4, "coupled": False}]
    return {"sample_id": sample_id, "flagged": sum(kept) < 2, "model_answer": None, "candidates": cands, "tokens": tokens}


@pytest.fixture()
def store(tmp_path):
    with Store(tmp_path / "hscr.duckdb") as db:
        image_id = db.add_image(png_bytes(0), 8, 8, modality="CT")
        ids = [db.add_sample("toy", "train", image_id, f"question {i} ?", "the left lung", "open")[0] for i in range(3)]
        db.ensure_generation_run("run1", "tiny", "{}")
        db.sample_ids = ids
        yield db


def test_image_stored_once(store):
    first = store.add_image(png_bytes(1), 8, 8)
    second = store.add_image(png_bytes(1), 8, 8)
    assert first == second
    assert store.execute("SELECT count(*) FROM images WHERE id = ?", [first]).fetchone()[0] == 1
    assert store.image_path(first).read_bytes() == png_bytes(1)


def test_duplicate_sample_merged(store):
    image_id = store.samples()[0]["image_id"]
    sample_id, inserted = store.add_sample("toy", "train", image_id, "question  0 ?", "x", "open")
    assert not inserted and sample_id == store.sample_ids[0]
    with pytest.raises(HSCRError, match="answer_type"):
        store.add_sample("toy", "train", image_id, "new ?", "x", "maybe")


def test_write_generation_all_or_nothing(store):
    good = result(store.sample_ids[0], ["the right lung"])
    bad = result(store.sample_ids[1], ["the right liver"])
    bad["tokens"][0]["score"] = "not a number"
    with pytest.raises(ValueError):
        store.write_generation("run1", [good, bad])
    assert store.execute("SELECT count(*) FROM candidates").fetchone()[0] == 0
    assert store.execute("SELECT count(*) FROM generation_done").fetchone()[0] == 0
    store.write_generation("run1", [good])
    store.write_generation("run1", [good])  # a repeat is skipped, not duplicated
    assert store.done_sample_ids("run1") == {store.sample_ids[0]}
    assert store.execute("SELECT count(*) FROM candidates").fetchone()[0] == 2


def test_crash_mid_transaction_leaves_nothing(tmp_path):
    """A process killed inside a write leaves no half-written sample after reopening."""
    import subprocess
    import sys
    import textwrap

    db_path = tmp_path / "crash.duckdb"
    script = textwrap.dedent(f"""
        import os
        from hscr.store import Store
        store = Store({str(db_path)!r})
        store.ensure_generation_run("r", "m", "{{}}")
        with store.transaction() as cur:
            cur.execute("INSERT INTO candidates (id, run_id, sample_id, text, num_replaced, kept) VALUES ('c', 'r', 's', 't', 0, true)")
            os._exit(9)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9
    with Store(db_path) as store:
        assert store.execute("SELECT count(*) FROM candidates").fetchone()[0] == 0
        assert store.execute("SELECT count(*) FROM generation_runs").fetchone()[0] == 1


def test_reviews_fold_latest_wins(store):
    sample_id = store.sample_ids[0]
    store.write_generation("run1", [result(sample_id, ["the right lung", "a right liver", "no lung"])])
    cands = {c["text"]: c["id"] for c in store.candidates_for(sample_id)}
    record_review(store, "ana", sample_id, "edit", cands["the right lung"], {"text": "the right lungs"})
    record_review(store, "ben", sample_id, "edit", cands["the right lung"], {"text": "the right kidney"})
    record_review(store, "ana", sample_id, "acceptable", cands["no lung"])
    record_review(store, "ana", sample_id, "approve")
    record_review(store, "ben", sample_id, "reject")
    record_review(store, "ana", sample_id, "reopen")
    record_review(store, "ana", sample_id, "note", payload={"text": "check the apex"})
    state = review_state(store, sample_id)
    assert state.status == "pending"
    assert state.edits == {cands["the right lung"]: "the right kidney"}
    assert state.excluded == {cands["no lung"]}
    assert [n["text"] for n in state.notes] == ["check the apex"]
    rows = store.reviews_for(sample_id)
    assert [r["user"] for r in rows] == ["ana", "ben", "ana", "ana", "ben", "ana", "ana"]
    assert all(r["created_at"] is not None for r in rows)


@pytest.mark.parametrize(
    "action, candidate, payload, message",
    [
        ("delete", None, None, "unknown review action"),
        ("edit", None, {"text": "  "}, "non-empty text"),
        ("acceptable", None, None, "needs the id"),
        ("rerank", None, {"order": []}, "non-empty list"),
        ("rerank", None, {"order": ["nope"]}, "unknown candidate ids"),
        ("approve", "nope", None, "candidate 'nope' not found"),
    ],
)
def test_invalid_reviews_rejected(store, action, candidate, payload, message):
    sample_id = store.sample_ids[0]
    store.write_generation("run1", [result(sample_id, ["the right lung"])])
    with pytest.raises(HSCRError, match=message):
        record_review(store, "ana", sample_id, action, candidate, payload)
    assert store.reviews_for(sample_id) == []


def test_preferences_apply_reviews(store, tmp_path):
    first, second, third = store.sample_ids
    store.write_generation("run1", [
        result(first, ["the right lung", "a right liver", "no lung"]),
        result(second, ["the right lung", "a right liver"], kept=[True, False]),
        result(third, ["the right lung", "a right liver"]),
    ])
    cands = {c["text"]: c["id"] for c in store.candidates_for(first)}
    record_review(store, "ana", first, "edit", None, {"text": "the left lung, apex"})
    record_review(store, "ana", first, "edit", cands["a right liver"], {"text": "a right kidney"})
    record_review(store, "ana", first, "rerank", payload={"order": [cands["no lung"], cands["a right liver"], cands["the right lung"]]})
    record_review(store, "ana", first, "acceptable", cands["the right lung"])
    record_review(store, "ana", first, "approve")
    record_review(store, "ana", third, "reject")

    rows = {r.sample_id: r for r in load_preferences(store)}
    assert set(rows) == {first, second}
    row = rows[first]
    assert row.chosen == "the left lung, apex" and row.ref_chosen_logp is None
    assert row.rejected == ["no lung", "a right kidney"]
    assert row.ref_rejected_logps == [-5.0, None]
    assert rows[second].rejected == ["the right lung"]
    assert rows[second].ref_chosen_logp == -1.5
    assert [r.sample_id for r in load_preferences(store, reviewed_only=True)] == [first]

    path = write_preferences_parquet(list(rows.values()), tmp_path / "prefs.parquet")
    assert read_preferences_parquet(path) == list(rows.values())


def test_candidate_ids_stable():
    assert candidate_key("r", "s", "text") == candidate_key("r", "s", "text")
    assert candidate_key("r", "s", "text") != candidate_key("r", "s", "text2")


def test_second_writer_gets_clear_error(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "locked.duckdb"
    with Store(path):
        proc = subprocess.run(
            [sys.executable, "-c", f"from hscr.store import Store; Store({str(path)!r})"],
            capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode != 0
    assert "another HSCR process" in proc.stderr


def test_regeneration_keeps_reviewed_run(store):
    """A new generation run must not hide the candidates a reviewer re-ranked in an older run."""
    import time

    sample_id = store.sample_ids[0]
    store.write_generation("run1", [result(sample_id, ["the right lung", "a right liver"])])
    old = {c["text"]: c["id"] for c in store.candidates_for(sample_id, "run1")}
    record_review(store, "ana", sample_id, "rerank", payload={"order": [old["a right liver"], old["the right lung"]]})
    record_review(store, "ana", sample_id, "approve")
    time.sleep(0.01)
    store.ensure_generation_run("run2", "tiny", "{}")
    store.write_generation("run2", [result(sample_id, ["no lung"]), result(store.sample_ids[1], ["no lung"])])

    rows = {r.sample_id: r for r in load_preferences(store)}
    assert rows[sample_id].run_id == "run1"
    assert rows[sample_id].rejected == ["a right liver", "the right lung"]
    assert rows[store.sample_ids[1]].run_id == "run2"
    assert [r.sample_id for r in load_preferences(store, reviewed_only=True)] == [sample_id]
