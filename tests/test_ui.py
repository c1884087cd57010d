"""A scoring run as a data engineer sees it in the Prefect UI, in a real headless Chromium:
the run is named and tagged, its summary hangs on the flow run (not "Flow run: None"), the
summary shows bars, the time per stage and the file's URL as text, and nothing on the page
links to a path the browser cannot open. `benchmarks/ui_tour.py` takes the whole tour with
screenshots."""

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.browser import CHROMIUM, launch_browser
from tests.test_deployment import prefect_server  # noqa: F401  (a real server on 127.0.0.1)
from tests.test_stop import ROOT

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright not installed"),
]


def test_a_scoring_run_reads_right_in_the_ui(prefect_server, uploads, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    source, _ = uploads
    output = tmp_path / "lake"
    done = subprocess.run([sys.executable, "-m", "gender_pipeline.cli", "score", "--source", str(source), "--output",
                           str(output), "--registry", str(tmp_path / "registry"), "--workers", "0",
                           "--date", "2026-03-04"], cwd=ROOT, env=prefect_server, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    failing = subprocess.run([sys.executable, "-m", "gender_pipeline.cli", "score", "--source", str(empty),
                              "--output", str(output), "--registry", str(tmp_path / "registry"), "--workers", "0",
                              "--date", "2026-03-05"], cwd=ROOT, env=prefect_server, capture_output=True, text=True,
                             timeout=300)
    assert failing.returncode == 4 and "Traceback" not in failing.stderr, failing.stderr[-3000:]
    warning = subprocess.run([sys.executable, "-m", "gender_pipeline.cli", "score", "--source", str(empty),
                              "--output", str(tmp_path / "lake-2"), "--registry", str(tmp_path / "registry"),
                              "--workers", "0"], cwd=ROOT, env=prefect_server, capture_output=True, text=True,
                             timeout=300)
    assert warning.returncode == 0, warning.stderr[-3000:]
    api = prefect_server["PREFECT_API_URL"]
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        (run,) = [r for r in runs if r.state.is_completed() and r.state.name == "Completed"]
        (warned,) = [r for r in runs if r.state.name == "Warnings"]
        (failed,) = [r for r in runs if r.state.is_failed()]
        summaries = [a for a in client.read_artifacts() if a.key and a.key.startswith("scoring-summary-")]
        (summary,) = [a for a in summaries if a.flow_run_id == run.id]
        (failure,) = [a for a in summaries if a.flow_run_id == failed.id]
    ui = api.removesuffix("/api")
    with sync_playwright() as playwright:
        browser = launch_browser(playwright)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(f"{ui}/runs/flow-run/{run.id}", wait_until="networkidle")  # the V1 UI: it groups artifacts
        page.get_by_text(run.name, exact=False).first.wait_for(timeout=30_000)
        page.get_by_text("Artifacts", exact=True).first.click(timeout=30_000)
        page.get_by_text("scoring-summary-", exact=False).first.wait_for(timeout=30_000)
        text = page.inner_text("body")
        assert "2026-03-04 " in text and "lake" in text  # the run's name: date, source, output
        assert "started-by:cli" in text and "model:dlib-gender-v1@1" in text  # its tags
        flow_run_section = text.split("Flow run", 1)[1].split("Task runs", 1)[0]
        assert "None" not in flow_run_section and "scoring-summary-" in flow_run_section

        page.goto(f"{ui}/artifacts/artifact/{summary.id}", wait_until="networkidle")
        page.get_by_text("Where the time went").wait_for(timeout=30_000)
        text = page.inner_text("body")
        assert "█" in text and "check the listing (suite)" in text
        assert f"{output}/predictions/dt=2026-03-04/part-" in text  # the file's URL, as text
        hrefs = page.eval_on_selector_all("a[href]", "links => links.map(a => a.getAttribute('href'))")
        assert not [h for h in hrefs if h.startswith(str(tmp_path))], "a link the browser cannot open"
        assert "Data checks: listing: 5 of 5 expectations passed" in text and "abstains" in text

        # The runs list tells the nights apart; a failed night says what happened on its page.
        page.goto(f"{ui}/v2/runs", wait_until="networkidle")  # the V2 runs list shows tags
        page.get_by_text(failed.name, exact=False).first.wait_for(timeout=30_000)
        page.wait_for_timeout(1000)
        text = page.inner_text("body")
        # Each night's state by its name (a list with long run names folds the tags into "+4").
        assert "Completed" in text and "Failed" in text and "Warnings" in text
        # A night with warnings stands apart from a clean one in both runs lists: its name says so.
        for runs_list in (f"{ui}/v2/runs", f"{ui}/runs"):
            page.goto(runs_list, wait_until="networkidle")
            page.get_by_text(warned.name, exact=False).first.wait_for(timeout=30_000)
            page.wait_for_timeout(1000)
            text = page.inner_text("body")
            assert "⚠ 1 warning · " in text and "Warnings" in text and text.count("⚠") == 1, runs_list
        page.goto(f"{ui}/v2/runs/flow-run/{failed.id}", wait_until="networkidle")
        page.get_by_text("ListingLooksWrong", exact=False).first.wait_for(timeout=30_000)
        assert "outcome:failed" in page.inner_text("body")
        page.goto(f"{ui}/artifacts/artifact/{failure.id}", wait_until="networkidle")
        page.get_by_text("Nightly scoring FAILED", exact=False).first.wait_for(timeout=30_000)
        text = page.inner_text("body")
        assert "written: nothing" in text and "stage: listing the source" in text and "failed" in text
        # The trend in the V1 UI: no HTML entity shown as written, no column past the page's edge.
        assert "| completed |" not in text and "completed" in text and "&#" not in text and "&nbsp;" not in text
        table = page.locator("table").last
        assert "outcome" in table.inner_text()
        right = page.evaluate("(t) => t.getBoundingClientRect().right", table.element_handle())
        assert right <= page.viewport_size["width"], right
        browser.close()
