"""Take the README's screenshots of every tab from the demo, in Chromium.

Builds the demo (or reuses it) in ``--data`` and generates preference data for a few demo
samples. Then it starts ``python app.py`` on a free local port and drives it: it opens a sample,
re-ranks and annotates one in review, trains the demo preset for a few steps, and evaluates and
compares the base and trained models. Writes ``docs/app-<tab>.png``.

    python docs/screenshots.py --data /tmp/hscr-shots
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from browser import AppProcess, click_row, fill, launch_chromium, local_only, open_app, open_tab  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/hscr-shots", help="data folder for the demo (default /tmp/hscr-shots)")
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder for the PNG files (default docs/)")
    parser.add_argument("--limit", type=int, default=24, help="demo samples to generate and evaluate (default 24)")
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=180_000)

    from hscr.demo import ensure_demo

    data = Path(args.data)
    db = data / "hscr.duckdb"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = ensure_demo(data, db_path=db)["model_dir"]
    # Open questions have longer answers, so they get more than one dispreferred answer.
    subprocess.run([sys.executable, "-m", "hscr", "generate", "--model", model, "--db", str(db), "--dataset", "demo",
                    "--split", "train", "--limit", str(args.limit), "--set", "min_similarity_gap=0.0"],
                   check=True, cwd=REPO)

    app = AppProcess(db, model).start(timeout=180)
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(180_000)
            local_only(page)
            open_app(page, app.url)

            expect(page.locator("#browse-counts")).to_contain_text("samples match")
            page.screenshot(path=str(out / "app-data.png"), full_page=True)

            click_row(page, "browse-table", "lesion")
            expect(page.locator("#heatmap-caption")).to_contain_text("red patches")
            page.screenshot(path=str(out / "app-inspect.png"), full_page=True)

            open_tab(page, "Review")
            rows = page.locator("#review-candidates tbody tr")
            for _ in range(args.limit):
                expect(page.locator("#review-progress")).to_contain_text("reviewed")
                if rows.count() >= 2:
                    break
                current = page.locator("#review-info").inner_text()
                page.locator("#review-next").click()
                expect(page.locator("#review-info")).not_to_have_text(current)
            if rows.count() >= 2:
                fill(page, "review-order", "2,1")
                page.locator("#review-rerank").click()
                expect(page.locator("#review-history")).to_contain_text("rerank")
            fill(page, "review-note", "second answer is closer to the image")
            page.locator("#review-add-note").click()
            expect(page.locator("#review-history")).to_contain_text("note")
            page.screenshot(path=str(out / "app-review.png"), full_page=True)

            open_tab(page, "Train")
            page.locator("#train-preset input").click()
            page.get_by_role("option", name="demo model on CPU").click()
            page.get_by_text("Settings").click()
            fill(page, "train-max-steps", "12")
            fill(page, "train-save-steps", "4")
            page.get_by_text("Settings").click()
            page.locator("#train-start").click()
            expect(page.locator("#train-status")).to_contain_text("state succeeded")
            page.screenshot(path=str(out / "app-train.png"), full_page=True)

            open_tab(page, "Compare")
            page.get_by_text("Start an evaluation").click()
            fill(page, "eval-split", "test")
            fill(page, "eval-limit", str(args.limit))
            page.locator("#eval-start").click()
            expect(page.locator("#eval-message")).to_contain_text("samples")
            page.locator("#eval-adapter input").click()
            page.get_by_role("option").filter(has_text="succeeded").first.click()
            page.locator("#eval-start").click()
            expect(page.locator("#compare-metrics")).to_contain_text("trained")
            expect(page.locator("#compare-metrics")).to_contain_text("base")
            expect(page.locator("#compare-summary")).to_contain_text("fixed")
            click_row(page, "compare-samples", "?")
            expect(page.locator("#compare-detail")).to_contain_text("trained")
            page.screenshot(path=str(out / "app-compare.png"), full_page=True)
            browser.close()
    finally:
        app.stop()
    print(f"screenshots written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
