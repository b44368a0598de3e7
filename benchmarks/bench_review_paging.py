"""Review-queue paging with 100k candidates: the app's SQL queue against replaying every review.

Builds a database with ``--samples`` generated samples (4 candidates each, so 25,000 samples give
100,000 candidates) and reviews on a share of them, then pages through the review queue with
``app.review_tab.review_view`` (one indexed query per page plus the sample's own rows). The
baseline finds the same page by replaying every sample's reviews in Python
(``hscr.reviews.review_states``) and filtering the pending ones, as a queue without the SQL
status would. Prints milliseconds per page for both and the ratio.

    python benchmarks/bench_review_paging.py --samples 25000 --pages 20
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from app import review_tab  # noqa: E402
from app.state import AppContext  # noqa: E402
from hscr.reviews import review_states  # noqa: E402
from hscr.store import Store, candidate_key, sample_key  # noqa: E402

RUN = "gen-bench"


def build(store: Store, num_samples: int, reviewed_share: float) -> None:
    image = Image.new("RGB", (64, 64), (90, 90, 90))
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    image_id = store.add_image(buffer.getvalue(), 64, 64, modality="CT", source_format="png")
    store.ensure_generation_run(RUN, "bench", "{}")
    samples, candidates, done = [], [], []
    for index in range(num_samples):
        question = f"question {index} ?"
        sample_id = sample_key("bench", "train", image_id, question)
        samples.append([sample_id, "bench", "train", image_id, question, "left upper lobe", "open", "en"])
        texts = ["left upper lobe", "left lower lobe", "right lower lobe", "right lower zone"]
        for rank, text in enumerate(texts):
            candidates.append([candidate_key(RUN, sample_id, text), RUN, sample_id, text, rank, [0], ["x"],
                               1.0 - 0.2 * rank, rank, rank < 3, -1.0 - rank])
        done.append([RUN, sample_id, False, None])
    # Bulk inserts through DataFrames: executemany takes minutes for 100k rows.
    sample_frame = pd.DataFrame(samples, columns=["id", "dataset", "split", "image_id", "question", "answer",
                                                  "answer_type", "lang"])
    candidate_frame = pd.DataFrame(candidates, columns=["id", "run_id", "sample_id", "text", "num_replaced",
                                                        "replaced_positions", "replaced_tokens", "similarity",
                                                        "rank", "kept", "ref_logp"])
    done_frame = pd.DataFrame(done, columns=["run_id", "sample_id", "flagged", "model_answer"])
    with store.transaction() as cur:
        cur.register("sample_frame", sample_frame)
        cur.register("candidate_frame", candidate_frame)
        cur.register("done_frame", done_frame)
        cur.execute("INSERT INTO samples (id, dataset, split, image_id, question, answer, answer_type, lang) "
                    "SELECT * FROM sample_frame")
        cur.execute("INSERT INTO candidates SELECT * FROM candidate_frame")
        cur.execute("INSERT INTO generation_done (run_id, sample_id, flagged, model_answer) SELECT * FROM done_frame")
    rng = random.Random(0)
    reviewed = rng.sample([row[0] for row in samples], int(num_samples * reviewed_share))
    review_frame = pd.DataFrame(
        [["bench", sample_id, "note", '{"text": "seen"}'] for sample_id in reviewed]
        + [["bench", sample_id, rng.choice(["approve", "reject"]), "{}"] for sample_id in reviewed],
        columns=["user", "sample_id", "action", "payload_json"],
    )
    with store.transaction() as cur:
        cur.register("review_frame", review_frame)
        cur.execute('INSERT INTO reviews ("user", sample_id, action, payload_json) SELECT * FROM review_frame')


def baseline_page(store: Store, position: int) -> str:
    """Find the position-th pending sample by replaying all reviews in Python."""
    states = review_states(store)
    ids = [row[0] for row in store.execute(
        "SELECT s.id FROM samples s WHERE s.id IN (SELECT sample_id FROM generation_done) ORDER BY s.dataset, s.split, s.id"
    ).fetchall()]
    pending = [sample_id for sample_id in ids if sample_id not in states or states[sample_id].status == "pending"]
    return pending[position - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=25_000, help="generated samples (4 candidates each)")
    parser.add_argument("--reviewed", type=float, default=0.3, help="share of samples with reviews")
    parser.add_argument("--pages", type=int, default=20, help="pages to time per method")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hscr-bench-") as folder:
        store = Store(Path(folder) / "hscr.duckdb")
        started = time.perf_counter()
        build(store, args.samples, args.reviewed)
        count = store.execute("SELECT count(*) FROM candidates").fetchone()[0]
        print(f"built {args.samples} samples, {count} candidates in {time.perf_counter() - started:.1f} s")
        context = AppContext(store=store, model="unused", default_user="bench")
        positions = [1 + (i * 997) % (args.samples // 2) for i in range(args.pages)]

        fast, slow = [], []
        for position in positions:
            begin = time.perf_counter()
            view = review_tab.review_view(context, "(all)", "pending", position)
            fast.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            expected = baseline_page(store, position)
            slow.append(time.perf_counter() - begin)
            assert view[0] == expected, (position, view[0], expected)
        store.close()

    fast_ms = statistics.median(fast) * 1000
    slow_ms = statistics.median(slow) * 1000
    print(f"review_view page (SQL status): median {fast_ms:.1f} ms, max {max(fast) * 1000:.1f} ms")
    print(f"baseline page (replay all reviews): median {slow_ms:.1f} ms")
    print(f"speedup_vs_replay: {slow_ms / fast_ms:.2f}")


if __name__ == "__main__":
    main()
