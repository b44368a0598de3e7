"""The real app in a real browser: Chromium driven by Playwright against ``python app.py``.

One app process serves every step of this module, in order. The steps browse the data, colour
the tokens of a sample, edit and re-rank in the review queue, train with live curves, cancel and
resume, and evaluate and compare. The last step restarts the app with a login and checks what
the database and the run folder kept.
Screenshots of each tab go to ``$HSCR_SCREENSHOTS`` (default: the module's temporary folder).
``docs/screenshots.py`` takes the README's screenshots from the demo model instead.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from app.auth import hash_password, write_users
from browser import AppProcess, chromium_path, click_row, fill, launch_chromium, local_only, open_app, open_tab
from support import save_tiny_model, write_image_folder

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api")
# Jobs and model calls share two busy cores with other tests, so waits get a generous default.
sync_api.expect.set_options(timeout=60_000)

ROWS = [
    ("img0.png", "is there a lesion in the left lung ?", "yes"),
    ("img1.png", "what modality is this image ?", "ct"),
    ("img2.png", "which organ is shown ?", "the chest shows a round nodule in the right upper lobe"),
    ("img3.png", "how many lesions are visible ?", "two lesions in the lower lobe"),
    ("img0.png", "where is the abnormality located ?", "left lower lobe peripheral zone"),
    ("img1.png", "is the heart enlarged ?", "no"),
]
LONG_ANSWER = "the chest shows a round nodule in the right upper lobe"


@pytest.fixture(scope="module")
def workspace():
    """A tiny model, a six-sample folder dataset and generated candidates in a fresh database.

    The folder is a private temporary directory rather than ``tmp_path``, which a concurrent
    pytest run of the same user may rotate away while this module is still running.
    """
    if chromium_path() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from hscr.config import GenerateConfig
    from hscr.decoding import greedy_generate
    from hscr.images import open_stored
    from hscr.datasets import folder
    from hscr.datasets.common import ImportOptions
    from hscr.generate import run_generation
    from hscr.models import load_vlm
    from hscr.store import Store

    holder = tempfile.TemporaryDirectory(prefix="hscr-app-test-")
    root = Path(holder.name)
    model = save_tiny_model(root / "model", image_size=32, patch_size=8)
    write_image_folder(root / "toy", [{"image": i, "question": q, "answer": a} for i, q, a in ROWS], image_size=32)
    db = root / "data" / "hscr.duckdb"
    with Store(db) as store:
        report = folder.import_path(store, root / "toy", ImportOptions(name="toy"))
        assert report.imported == {"train": 6}
        vlm = load_vlm(str(model), device="cpu")
        config = GenerateConfig(num_coupled_tokens=4, min_similarity_gap=0.0, batch_size=6)
        summary = run_generation(vlm, store, config, progress=False)
        assert summary["processed"] == 6
        sample = next(s for s in store.samples() if s["answer"] == LONG_ANSWER)
        image = open_stored(store.data_dir / sample["image_path"])
        own_answer = greedy_generate(vlm, [image], [sample["question"]], max_new_tokens=32)[0]
    yield {"root": root, "model": model, "db": db, "own_answer": own_answer}
    holder.cleanup()


@pytest.fixture(scope="module")
def app(workspace):
    process = AppProcess(workspace["db"], workspace["model"]).start(timeout=120)
    yield process
    process.stop()
    print(process.log())  # shown by pytest when a test of this module failed


@pytest.fixture(scope="module")
def page(app, workspace):
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(60_000)
        tab = context.new_page()
        tab.blocked = local_only(tab)
        tab.screenshot_dir = workspace["root"] / "screenshots"
        open_app(tab, app.url)
        yield tab
        browser.close()


def screenshot(page, name: str) -> None:
    folder = Path(os.environ.get("HSCR_SCREENSHOTS") or page.screenshot_dir)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"app-{name}.png"), full_page=True)


def test_data_tab_lists_samples(page):
    counts = page.locator("#browse-counts")
    sync_api.expect(counts).to_contain_text("6 samples match: 6 pending", timeout=60_000)
    sync_api.expect(page.locator("#app-header")).to_contain_text(f"user {getpass.getuser()}")
    sync_api.expect(page.locator("#browse-table")).to_contain_text("which organ is shown ?")
    screenshot(page, "data")


@pytest.mark.parametrize("path", ["/etc/passwd", str(Path(__file__).resolve())])
def test_server_refuses_files_outside_data(app, path):
    url = f"{app.url}gradio_api/file={path}"
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(url, timeout=30)
    assert error.value.code in (403, 404)


def test_inspect_colours_tokens(page, workspace):
    click_row(page, "browse-table", "which organ is shown ?")
    tokens = page.locator("#inspect-tokens .hscr-token")
    sync_api.expect(tokens.first).to_be_visible(timeout=90_000)
    pieces = page.eval_on_selector_all("#inspect-tokens .hscr-token", "spans => spans.map(s => s.firstChild.textContent)")
    assert "".join(pieces) == LONG_ANSWER + "</s>"

    first = tokens.first
    title = first.get_attribute("title")
    assert "nats" in title
    assert "p with image =" in title
    assert "p with 70% of image tokens removed =" in title
    assert "rgba(" in first.get_attribute("style")
    score = float(first.get_attribute("data-score"))
    p_full = float(first.get_attribute("data-p-full"))
    p_drop = float(first.get_attribute("data-p-drop"))
    assert score == pytest.approx(math.log(p_full / p_drop), abs=1e-3)
    assert page.locator("#inspect-tokens .hscr-coupled").count() >= 1
    sync_api.expect(page.locator("#inspect-tokens .hscr-legend")).to_contain_text("nats")
    sync_api.expect(page.locator("#inspect-heatmap img")).to_be_visible(timeout=60_000)
    sync_api.expect(page.locator("#heatmap-caption")).to_contain_text("red patches")
    timing = page.locator("#inspect-timing").inner_text()
    assert re.search(r"token view: \d+\.\d\d s", timing)
    own = page.locator("#inspect-own-answer textarea, #inspect-own-answer input").first
    sync_api.expect(own).to_have_value(workspace["own_answer"], timeout=30_000)
    screenshot(page, "inspect")


def test_review_edit_and_rerank(page):
    open_tab(page, "Review")
    sync_api.expect(page.locator("#review-progress")).to_contain_text("0 / 6", timeout=30_000)
    rows = page.locator("#review-candidates tbody tr")
    # Short answers ("yes") have one dispreferred answer; move on to one with at least three.
    for _ in range(len(ROWS)):
        sync_api.expect(page.locator("#review-candidates")).to_contain_text("answer", timeout=30_000)
        if rows.count() >= 3:
            break
        current = page.locator("#review-info").inner_text()
        page.locator("#review-next").click()
        sync_api.expect(page.locator("#review-info")).not_to_have_text(current)
    assert rows.count() >= 3
    sync_api.expect(page.locator("#review-candidates mark.hscr-diff").first).to_be_visible()

    fill(page, "review-chosen", "edited preferred answer")
    page.locator("#review-save-chosen").click()
    history = page.locator("#review-history")
    sync_api.expect(history).to_contain_text("edited preferred answer")

    fill(page, "review-order", "2,1")
    page.locator("#review-rerank").click()
    sync_api.expect(history).to_contain_text("order: #2, #1")
    sync_api.expect(page.locator("#review-candidates")).to_contain_text("#1 in training")
    screenshot(page, "review")

    fill(page, "review-order", "9")
    page.locator("#review-rerank").click()
    sync_api.expect(page.get_by_text("use numbers from 1 to").first).to_be_visible()

    # The shortcut works outside text fields: focus the page body, then press "a".
    page.locator("#review-progress").click()
    page.keyboard.press("a")
    sync_api.expect(page.locator("#review-progress")).to_contain_text("1 / 6")


def plot_points(page) -> int:
    return page.evaluate(
        "() => { const p = document.querySelector('#train-curves .js-plotly-plot');"
        " return p && p.data && p.data.length ? p.data[0].x.length : 0; }"
    )


def choose_preset(page, name: str) -> None:
    page.locator("#train-preset input").click()
    page.get_by_role("option", name=name).click()


def test_training_curve_cancel_resume(page):
    open_tab(page, "Train")
    sync_api.expect(page.locator("#train-device")).to_contain_text("Device:")
    choose_preset(page, "smoke test (4 steps)")
    page.get_by_text("Settings").click()
    # Far more steps than the test waits for, so the run is still going when cancel arrives. On a
    # quiet machine the tiny model finished 400 steps before the first curve point was polled.
    fill(page, "train-max-steps", "20000")
    page.locator("#train-start").click()
    status = page.locator("#train-status")
    sync_api.expect(status).to_contain_text("state running")

    page.wait_for_function(
        "() => { const p = document.querySelector('#train-curves .js-plotly-plot');"
        " return p && p.data && p.data.length && p.data[0].x.length >= 1; }",
        timeout=120_000,
    )
    page.locator("#train-cancel").click()
    sync_api.expect(page.locator("#train-message")).to_contain_text("Cancelling")
    sync_api.expect(status).to_contain_text("state cancelled", timeout=90_000)
    sync_api.expect(status).to_contain_text("Resume")
    stopped_at = plot_points(page)
    assert 1 <= stopped_at < 20000

    page.locator("#train-resume").click()
    sync_api.expect(page.locator("#train-message")).to_contain_text("Resumed")
    page.wait_for_function(
        f"() => {{ const p = document.querySelector('#train-curves .js-plotly-plot');"
        f" return p && p.data[0].x.length > {stopped_at}; }}",
        timeout=120_000,
    )
    steps = page.evaluate("() => document.querySelector('#train-curves .js-plotly-plot').data[0].x")
    assert steps == sorted(set(steps))  # resumed from the checkpoint: no step logged twice
    page.locator("#train-cancel").click()
    sync_api.expect(status).to_contain_text("state cancelled", timeout=90_000)


def test_training_run_finishes(page):
    choose_preset(page, "smoke test (4 steps)")
    sync_api.expect(page.locator("#train-max-steps input")).to_have_value("4")
    page.locator("#train-start").click()
    status = page.locator("#train-status")
    sync_api.expect(status).to_contain_text("state succeeded", timeout=180_000)
    sync_api.expect(status).to_contain_text("step 4/4")
    sync_api.expect(status).to_contain_text("Adapter:")
    page.wait_for_function(
        "() => { const p = document.querySelector('#train-curves .js-plotly-plot');"
        " return p && p.data.length && p.data[0].x.length == 4; }"
    )
    screenshot(page, "train")
    sync_api.expect(page.locator("#train-runs")).to_contain_text("cancelled")


def test_compare_after_evaluations(page, app):
    open_tab(page, "Compare")
    page.get_by_text("Start an evaluation").click()
    fill(page, "eval-split", "train")
    sync_api.expect(page.locator("#eval-split textarea, #eval-split input").first).to_have_value("train")
    page.locator("#eval-start").click()
    sync_api.expect(page.locator("#eval-message")).to_contain_text("6 samples")

    page.locator("#eval-adapter input").click()
    page.get_by_role("option", name=re.compile(r"^train-.*succeeded")).click()
    page.locator("#eval-start").click()
    sync_api.expect(page.locator("#eval-message")).to_contain_text("6 samples")

    metrics = page.locator("#compare-metrics")
    sync_api.expect(metrics).to_contain_text("trained", timeout=180_000)
    sync_api.expect(metrics).to_contain_text("base", timeout=60_000)
    sync_api.expect(page.locator("#compare-chart .js-plotly-plot")).to_be_visible()
    sync_api.expect(page.locator("#compare-summary")).to_contain_text("fixed", timeout=60_000)
    samples = page.locator("#compare-samples")
    sync_api.expect(samples).to_contain_text("is there a lesion")
    screenshot(page, "compare")
    click_row(page, "compare-samples", "is there a lesion")
    sync_api.expect(page.locator("#compare-detail")).to_contain_text("trained")
    sync_api.expect(page.locator("#compare-sample input, #compare-sample textarea").first).not_to_have_value("")
    assert page.blocked == []


def test_restart_with_login_keeps_state(app, workspace, page):
    from hscr.store import Store

    app.stop()
    with Store(workspace["db"], read_only=True) as store:
        reviews = store.query('SELECT "user", action, candidate_id, payload_json FROM reviews ORDER BY id')
    actions = [r["action"] for r in reviews]
    assert actions == ["edit", "rerank", "approve"]
    assert {r["user"] for r in reviews} == {getpass.getuser()}
    assert json.loads(reviews[0]["payload_json"]) == {"text": "edited preferred answer"}
    assert reviews[0]["candidate_id"] is None
    assert len(json.loads(reviews[1]["payload_json"])["order"]) == 2

    # Start again with a login: the run view and the reviewer's name must come through.
    users = workspace["root"] / "users.json"
    write_users(users, {"alice": hash_password("alice-password", rounds=4)})
    app.extra_args = ["--auth", str(users)]
    app.start(timeout=120)
    page.goto(app.url)  # the login page first; open_app waits for the tabs, which come after it
    page.locator("input[type=password]").wait_for()
    page.locator("input[type=text], input:not([type])").first.fill("alice")
    page.locator("input[type=password]").fill("alice-password")
    page.locator("input[type=password]").press("Enter")
    sync_api.expect(page.locator("#app-header")).to_contain_text("user alice", timeout=60_000)

    open_tab(page, "Train")
    sync_api.expect(page.locator("#train-status")).to_contain_text("state succeeded", timeout=60_000)
    page.wait_for_function(
        "() => { const p = document.querySelector('#train-curves .js-plotly-plot'); return p && p.data.length; }"
    )
    assert plot_points(page) == 4

    open_tab(page, "Review")
    sync_api.expect(page.locator("#review-progress")).to_contain_text("1 / 6", timeout=30_000)
    fill(page, "review-note", "checked after restart")
    page.locator("#review-add-note").click()
    sync_api.expect(page.locator("#review-history")).to_contain_text("alice")

    app.stop()
    with Store(workspace["db"], read_only=True) as store:
        last = store.query('SELECT "user", action, payload_json FROM reviews ORDER BY id DESC LIMIT 1')[0]
    assert last["user"] == "alice"
    assert last["action"] == "note"
    assert json.loads(last["payload_json"]) == {"text": "checked after restart"}
