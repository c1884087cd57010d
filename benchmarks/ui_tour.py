"""A tour of the Prefect UI after a few `nightly-scoring` runs, in a real headless browser.

Starts a Prefect server of its own (temporary PREFECT_HOME, a free port on 127.0.0.1),
scores a small demo uploads tree four times with the CLI against it (a night with warnings;
the rest of the photos; nothing new; an empty source folder), then opens the UI with Playwright and Debian's Chromium and
takes full-page screenshots of what a data engineer would look at: the runs list, each
flow run (Logs, Artifacts, Parameters), every artifact listed (link artifacts followed),
the Artifacts page, each artifact key's history page and, with a short-lived
`gender-pipeline serve`, the deployment's parameters and its custom-run form.

Writes PNGs and tour.md (each screenshot and the text on it) under --out.

    .venv/bin/python benchmarks/ui_tour.py --out /tmp/ui-tour

Needs /usr/bin/chromium (`apt-get install chromium`) and `pip install playwright`; never
`playwright install` (the browser is launched from executable_path).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser import CHROMIUM, launch_browser  # noqa: E402

VIEWPORT = {"width": 1440, "height": 900}
UIS = ("v2", "v1")  # v2 is what http://127.0.0.1:N/ opens by default in Prefect 3.9; v1 via "Switch to V1 UI"
UI_PREFIX = {"v2": "/v2", "v1": ""}
# (scenario, the source, extra flags): a night with warnings (a photo limit leaves some for the
# next night), a clean one (the rest), one with nothing new, an empty source (the listing guard).
SCENARIOS = (("warnings", "uploads", ("--max-photos", "3")), ("new-photos", "uploads", ()),
             ("nothing-new", "uploads", ()), ("empty-source", "empty-uploads", ()))
PAGE_TIMEOUT_MS = 60_000
TEXT_LIMIT = 6000
MAX_SHOT_HEIGHT = 8000
INNER_SCROLL_JS = """() => {
  let extra = 0;
  for (const el of document.querySelectorAll('body *')) {
    if (el.clientHeight < 200) continue;
    const overflow = getComputedStyle(el).overflowY;
    if ((overflow === 'auto' || overflow === 'scroll') && el.scrollHeight > el.clientHeight + 2)
      extra = Math.max(extra, el.scrollHeight - el.clientHeight);
  }
  return extra;
}"""
# The sidebar's lines, dropped from the start of a page's text in tour.md.
NAV_LINES = {"Dashboard", "Runs", "Flows", "Deployments", "Work Pools", "Blocks", "Variables", "Automations",
             "Event Feed", "Concurrency", "Ready to scale?", "Upgrade", "Join the community", "Settings",
             "Switch to V1 UI", "Switch to V2 UI"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_group(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the process group of a child started in its own
    session (start_new_session=True), so its own children go with it."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Leftovers of the group (uvicorn workers...), if the leader went first.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def base_env(prefect_home: str, api_url: str | None) -> dict:
    env = dict(os.environ)
    env.update(PREFECT_HOME=prefect_home, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               GX_ANALYTICS_ENABLED="False", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


class PrefectServer:
    """`python -m prefect server start` on 127.0.0.1 with its own PREFECT_HOME."""

    def __init__(self, home: str, log_path: str, port: int | None = None, python: str = sys.executable):
        self.home = home
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"
        self.log_path = log_path
        self.python = python
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 180.0) -> "PrefectServer":
        os.makedirs(self.home, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.python, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=base_env(self.home, self.api_url), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"prefect server not healthy after {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        _stop_group(self.proc)
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> "PrefectServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the runs -------------------------------------------------------------------------------

@dataclass
class CliRun:
    scenario: str
    argv: list[str]
    returncode: int
    seconds: float
    output: str
    flow_run_id: str | None = None


def run_command(argv: list[str], env: dict, cwd: str, log_path: str, timeout: float = 900.0) -> tuple[int, float, str]:
    """Run a child in its own session (killed with its group on Ctrl-C or timeout)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc, grace=5)
        output, _ = proc.communicate()
        output += b"\n[ui_tour: killed after timeout]\n"
    finally:
        _stop_group(proc, grace=5)
    text = output.decode("utf-8", "replace")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(argv)}\n{text}\n[exit {proc.returncode}]\n\n")
    return proc.returncode, time.monotonic() - started, text


def build_uploads_tree(uploads: str, env: dict, project_dir: str, log_path: str) -> int:
    """gender_pipeline.demo.build_uploads, run with the project's code at project_dir."""
    code = ("import sys; from gender_pipeline.demo import build_uploads; "
            "print(len(build_uploads(sys.argv[1])))")
    rc, _, out = run_command([sys.executable, "-c", code, uploads], env, project_dir, log_path, 300)
    if rc != 0:
        raise RuntimeError(f"build_uploads failed ({rc}):\n{out[-3000:]}")
    return int(out.strip().splitlines()[-1])


def _client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Ctx:
        def __enter__(self):
            self._settings = temporary_settings({PREFECT_API_URL: api_url})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            try:
                self._client.__exit__(*exc)
            finally:
                self._settings.__exit__(*exc)

    return _Ctx()


def flow_run_ids(api_url: str) -> set[str]:
    with _client(api_url) as client:
        return {str(r.id) for r in client.read_flow_runs(limit=200)}


def score_command(source: str, lake: str, registry: str) -> list[str]:
    return [sys.executable, "-m", "gender_pipeline.cli", "score", "--source", source, "--output", lake,
            "--registry", registry, "--workers", "0"]


def run_scenarios(work: str, server: PrefectServer, project_dir: str, log_path: str) -> list[CliRun]:
    """The SCENARIOS' scoring runs against the server, in order."""
    uploads, empty, lake, registry = (os.path.join(work, d) for d in ("uploads", "empty-uploads", "lake", "registry"))
    env = base_env(server.home, server.api_url)
    build_uploads_tree(uploads, env, project_dir, log_path)
    os.makedirs(empty, exist_ok=True)
    runs = []
    for scenario, folder, extra in SCENARIOS:
        before = flow_run_ids(server.api_url)
        argv = score_command(os.path.join(work, folder), lake, registry) + list(extra)
        rc, seconds, output = run_command(argv, env, project_dir, log_path)
        new = sorted(flow_run_ids(server.api_url) - before)
        runs.append(CliRun(scenario, argv, rc, seconds, output, new[0] if new else None))
        print(f"ui_tour: {scenario}: exit {rc} in {seconds:.1f} s, flow run {new[0] if new else None}", flush=True)
    return runs


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def read_facts(api_url: str, runs: list[CliRun]) -> dict:
    """What the API says about the runs and their artifacts (to set beside the screenshots)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    facts = {}
    with _client(api_url) as client:
        for run in runs:
            if not run.flow_run_id:
                continue
            fr = client.read_flow_run(run.flow_run_id)
            artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
            facts[run.scenario] = {
                "id": str(fr.id), "name": fr.name, "tags": list(fr.tags), "state": fr.state_type.value,
                "start_time": _iso(fr.start_time), "end_time": _iso(fr.end_time),
                "total_run_time_s": fr.total_run_time.total_seconds() if fr.total_run_time else None,
                "cli_seconds": round(run.seconds, 1),
                "parameters": fr.parameters,
                "artifacts": [{"id": str(a.id), "key": a.key, "type": a.type, "description": a.description,
                               "flow_run_id": str(a.flow_run_id) if a.flow_run_id else None,
                               "task_run_id": str(a.task_run_id) if a.task_run_id else None,
                               "data": a.data} for a in artifacts],
            }
    return facts


def markdown_links(text: str) -> list[tuple[str, str]]:
    return re.findall(r"\[([^\]]*)\]\(([^)\s]+)\)", text or "")


# --- the deployment -------------------------------------------------------------------------

def start_serve(work: str, server: PrefectServer, project_dir: str, log_path: str) -> subprocess.Popen:
    source, lake = os.path.join(work, "uploads"), os.path.join(work, "lake")
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "gender_pipeline.cli", "serve", "--source", source, "--output", lake],
            env=base_env(server.home, server.api_url), cwd=project_dir, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()


def wait_for_deployment(api_url: str, proc: subprocess.Popen, timeout: float = 180.0) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        with _client(api_url) as client:
            deployments = client.read_deployments()
        if deployments:
            return str(deployments[0].id)
        time.sleep(1)
    return None


# --- the browser ----------------------------------------------------------------------------

def trim_text(text: str, limit: int = TEXT_LIMIT) -> str:
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    while lines and lines[0] in NAV_LINES:
        lines.pop(0)
    out = "\n".join(lines)
    return out if len(out) <= limit else out[:limit] + f"\n[... {len(out) - limit} more characters]"


@dataclass
class Shot:
    file: str
    title: str
    url: str
    text: str
    notes: list[str] = field(default_factory=list)
    page_title: str = ""


class Tour:
    """One browser page, numbered full-page screenshots, and what each showed."""

    def __init__(self, page, base_url: str, out: str):
        self.page = page
        self.base_url = base_url
        self.out = out
        self.shots: list[Shot] = []
        self.findings: dict = {}

    def settle(self, wait_for: str | None = None, notes: list[str] | None = None) -> None:
        from playwright.sync_api import TimeoutError as PWTimeout

        try:
            self.page.wait_for_load_state("networkidle", timeout=20_000)
        except PWTimeout:
            pass  # the UI polls; carry on with what is there
        if wait_for:
            try:
                self.page.get_by_text(wait_for, exact=False).first.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
            except PWTimeout:
                if notes is not None:
                    notes.append(f"timed out waiting for text {wait_for!r}")
        # Spinners and skeletons gone, if the UI shows any.
        try:
            self.page.wait_for_function(
                "() => !document.querySelector('[aria-busy=\"true\"], .p-loading-icon, .animate-pulse')",
                timeout=10_000)
        except PWTimeout:
            pass
        self.page.wait_for_timeout(500)  # a last render after the data arrived

    def goto(self, path: str, wait_for: str | None = None, notes: list[str] | None = None):
        url = path if path.startswith("http") else self.base_url + path
        response = self.page.goto(url, wait_until="domcontentloaded", timeout=PAGE_TIMEOUT_MS)
        self.settle(wait_for, notes)
        return response

    def shot(self, name: str, title: str, notes: list[str] | None = None) -> Shot:
        file = f"{len(self.shots) + 1:03d}-{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-')}.png"
        # The V1 UI scrolls inside its own container (the body is one screen high): make the
        # window as tall as that content so that the full-page screenshot holds all of it.
        extra = self.page.evaluate(INNER_SCROLL_JS)
        size = self.page.viewport_size or VIEWPORT
        if extra > 0:
            self.page.set_viewport_size({"width": size["width"], "height": min(size["height"] + extra, MAX_SHOT_HEIGHT)})
            self.page.wait_for_timeout(700)
        try:
            self.page.screenshot(path=os.path.join(self.out, file), full_page=True)
        finally:
            if extra > 0:
                self.page.set_viewport_size(size)
        text = trim_text(self.page.inner_text("body"))
        record = Shot(file, title, self.page.url, text, list(notes or []), self.page.title())
        self.shots.append(record)
        print(f"ui_tour: {file}", flush=True)
        return record

    def click_tab(self, name: str, notes: list[str]) -> bool:
        from playwright.sync_api import TimeoutError as PWTimeout

        candidates = [self.page.get_by_role("tab", name=name, exact=True),
                      self.page.get_by_role("link", name=name, exact=True),
                      self.page.get_by_role("button", name=name, exact=True),
                      self.page.get_by_text(name, exact=True)]
        for locator in candidates:
            try:
                if locator.count():
                    locator.first.click(timeout=10_000)
                    try:
                        self.page.wait_for_url(re.compile(rf"[?&]tab={re.escape(name)}"), timeout=10_000)
                    except PWTimeout:
                        notes.append(f"URL did not change to tab={name} after the click")
                    self.settle()
                    return True
            except PWTimeout:
                continue
        notes.append(f"no {name!r} tab found")
        return False

    def artifact_hrefs(self) -> list[str]:
        hrefs = self.page.eval_on_selector_all("a[href*='/artifacts/artifact/']", "els => els.map(e => e.getAttribute('href'))")
        return list(dict.fromkeys(h.split("?")[0] for h in hrefs if h))


def follow_link(tour: Tour, href: str, label: str, notes: list[str]) -> dict:
    """Click the anchor with this href (the link artifact's link) and record what it gives."""
    from playwright.sync_api import TimeoutError as PWTimeout

    page = tour.page
    absolute = urllib.parse.urljoin(page.url, href)
    result = {"href": href, "resolves_to": absolute, "target": None, "http_status": None,
              "page_url": None, "looks_like_404": None}
    anchor = page.locator(f"a[href={json.dumps(href)}]").first
    try:
        result["target"] = anchor.get_attribute("target", timeout=5000)
    except PWTimeout:
        notes.append("link anchor not found on the page")
        return result
    try:
        if result["target"] == "_blank":
            with page.context.expect_page(timeout=PAGE_TIMEOUT_MS) as new_page_info:
                anchor.click()
            target_page = new_page_info.value
            target_page.wait_for_load_state("domcontentloaded")
        else:
            with page.expect_navigation(timeout=PAGE_TIMEOUT_MS) as nav:
                anchor.click()
            target_page = page
            result["http_status"] = nav.value.status if nav.value else None
    except PWTimeout:
        notes.append("clicking the link navigated nowhere within the timeout")
        return result
    try:
        target_page.wait_for_load_state("networkidle", timeout=20_000)
        target_page.wait_for_function("() => document.body && document.body.innerText.trim().length > 0",
                                      timeout=20_000)
    except PWTimeout:
        pass
    target_page.wait_for_timeout(3000)  # the UI's 404 page draws itself in an animation
    result["page_url"] = target_page.url
    try:  # the server's own answer for that URL, as a browser asks for a page
        request = urllib.request.Request(absolute, headers={"Accept": "text/html"})
        with urllib.request.urlopen(request, timeout=30) as response:
            result["server_status"] = response.status
    except urllib.error.HTTPError as error:
        result["server_status"] = error.code
    except (urllib.error.URLError, ValueError, OSError) as error:
        result["server_status"] = f"unreachable: {error}"
    body = target_page.inner_text("body") if target_page.url.startswith("http") else ""
    result["looks_like_404"] = bool(re.search(r"\b404\b|not found|doesn.t exist|does not exist", body, re.I))
    if target_page is not page:
        tour.page = target_page
        tour.shot(f"{label}-link-followed", f"{label}: after clicking the link ({absolute})", notes)
        tour.page = page
        target_page.close()
    else:
        tour.shot(f"{label}-link-followed", f"{label}: after clicking the link ({absolute})", notes)
    return result


def open_run_tab(tour: Tour, prefix: str, run_id: str, name: str, tab: str, notes: list[str],
                 wait_for: str | None = None) -> None:
    """The flow run's page, then a click on one of its tabs (the V1 UI does not open a tab
    from the URL's ?tab= on a fresh load)."""
    tour.goto(f"{prefix}/runs/flow-run/{run_id}", wait_for=name, notes=notes)
    tour.click_tab(tab, notes)
    if wait_for:
        tour.settle(wait_for=wait_for, notes=notes)


def tour_flow_run(tour: Tour, ui: str, scenario: str, facts: dict) -> None:
    prefix = UI_PREFIX[ui]
    run_id, name = facts["id"], facts["name"]
    found = tour.findings.setdefault(ui, {}).setdefault(scenario, {})
    label = f"{ui}-{scenario}"

    notes: list[str] = []
    open_run_tab(tour, prefix, run_id, name, "Logs", notes)
    shot = tour.shot(f"{label}-flow-run-logs", f"{ui.upper()} {scenario}: flow run {name}, Logs tab", notes)
    found["flow_run_page_shows_name"] = name in shot.text
    found["logs_text"] = shot.text

    notes = []
    keys = [a["key"] for a in facts["artifacts"] if a["key"]]
    open_run_tab(tour, prefix, run_id, name, "Artifacts", notes, wait_for=keys[0] if keys else None)
    shot = tour.shot(f"{label}-flow-run-artifacts", f"{ui.upper()} {scenario}: flow run {name}, Artifacts tab", notes)
    hrefs = tour.artifact_hrefs()
    found["artifacts_tab_text"] = shot.text
    found["artifacts_tab_links"] = hrefs

    notes = []
    open_run_tab(tour, prefix, run_id, name, "Parameters", notes)
    tour.shot(f"{label}-flow-run-parameters", f"{ui.upper()} {scenario}: flow run {name}, Parameters tab", notes)

    by_id = {a["id"]: a for a in facts["artifacts"]}
    found["artifacts"] = []
    for index, href in enumerate(hrefs):
        notes = []
        artifact_id = href.rstrip("/").rsplit("/", 1)[-1]
        artifact = by_id.get(artifact_id, {})
        key = artifact.get("key") or artifact_id[:8]
        open_run_tab(tour, prefix, run_id, name, "Artifacts", notes, wait_for=artifact.get("key"))
        try:
            tour.page.locator(f"a[href^={json.dumps(href)}]").first.click(timeout=20_000)
            tour.page.wait_for_url(re.compile(re.escape(artifact_id)), timeout=PAGE_TIMEOUT_MS)
        except Exception as error:  # noqa: BLE001 - record and open it directly
            notes.append(f"click through failed ({type(error).__name__}); opened {href} directly")
            tour.goto(href)
        tour.settle(wait_for=key if artifact.get("key") else None, notes=notes)
        artifact_label = f"{label}-artifact-{index + 1:02d}-{key}"
        shot = tour.shot(artifact_label, f"{ui.upper()} {scenario}: artifact {key} ({artifact.get('type')})", notes)
        entry = {"id": artifact_id, "key": key, "type": artifact.get("type"), "file": shot.file, "text": shot.text,
                 "links": []}
        for link_text, link in markdown_links(artifact.get("data") if isinstance(artifact.get("data"), str) else ""):
            entry["links"].append(follow_link(tour, link, artifact_label, notes))
            tour.goto(href, wait_for=key, notes=[])
        found["artifacts"].append(entry)


def tour_ui(tour: Tour, ui: str, facts: dict, keys: list[str]) -> None:
    prefix = UI_PREFIX[ui]
    notes: list[str] = []
    tour.goto(f"{prefix}/dashboard", wait_for="Flow Runs", notes=notes)
    tour.shot(f"{ui}-dashboard", f"{ui.upper()}: the dashboard", notes)
    notes = []
    names = [f["name"] for f in facts.values()]
    tour.goto(f"{prefix}/runs", wait_for=names[-1] if names else None, notes=notes)
    shot = tour.shot(f"{ui}-runs-list", f"{ui.upper()}: the flow runs list", notes)
    tour.findings.setdefault(ui, {})["runs_list_text"] = shot.text

    for scenario, run_facts in facts.items():
        tour_flow_run(tour, ui, scenario, run_facts)

    notes = []
    tour.goto(f"{prefix}/artifacts", wait_for=keys[0] if keys else None, notes=notes)
    tour.shot(f"{ui}-artifacts-page", f"{ui.upper()}: the Artifacts page", notes)
    for key in keys:
        notes = []
        tour.goto(f"{prefix}/artifacts/key/{urllib.parse.quote(key)}", wait_for=key, notes=notes)
        tour.shot(f"{ui}-artifact-key-{key}", f"{ui.upper()}: history of artifact key {key}", notes)


def tour_deployment(tour: Tour, ui: str, deployment_id: str) -> None:
    prefix = UI_PREFIX[ui]
    for tab in ("Parameters", "Description"):
        notes: list[str] = []
        tour.goto(f"{prefix}/deployments/deployment/{deployment_id}", wait_for="nightly-scoring", notes=notes)
        if tour.click_tab(tab, notes):
            tour.shot(f"{ui}-deployment-{tab.lower()}", f"{ui.upper()}: deployment nightly-scoring, {tab} tab", notes)
    notes = []
    tour.goto(f"{prefix}/deployments/deployment/{deployment_id}", wait_for="nightly-scoring", notes=notes)
    try:  # Run > Custom run, as a person would
        tour.page.get_by_role("button", name=re.compile(r"^\s*Run\s*$")).first.click(timeout=10_000)
        tour.page.get_by_text("Custom run", exact=True).first.click(timeout=10_000)
        tour.page.wait_for_url(re.compile(r"/run(\?|$)"), timeout=PAGE_TIMEOUT_MS)
        tour.settle(wait_for="source", notes=notes)
    except Exception as error:  # noqa: BLE001
        notes.append(f"Run > Custom run not clickable ({type(error).__name__}); opened the form's URL")
        tour.goto(f"{prefix}/deployments/deployment/{deployment_id}/run", wait_for="source", notes=notes)
    shot = tour.shot(f"{ui}-deployment-custom-run", f"{ui.upper()}: deployment nightly-scoring, Run > Custom run", notes)
    tour.findings.setdefault(ui, {})["custom_run_text"] = shot.text


# --- the report -----------------------------------------------------------------------------

def write_tour_md(out: str, shots: list[Shot], runs: list[CliRun], facts: dict, server_url: str,
                  timings: dict, link_results: list[dict]) -> str:
    lines = ["# Prefect UI tour", "",
             f"Server: {server_url} (Prefect UI, default V2 at /v2, V1 at /).", ""]
    lines += ["## Timings", ""] + [f"- {k}: {v:.1f} s" for k, v in timings.items()] + [""]
    lines += ["## Runs", "", "| scenario | flow run | name | tags | state | CLI seconds | Prefect run time s | exit |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        f = facts.get(run.scenario, {})
        lines.append(f"| {run.scenario} | {run.flow_run_id} | {f.get('name')} | {f.get('tags')} | {f.get('state')} "
                     f"| {run.seconds:.1f} | {f.get('total_run_time_s')} | {run.returncode} |")
    lines += ["", "Commands:", ""] + [f"- `{' '.join(r.argv)}`" for r in runs] + [""]
    lines += ["## Artifacts (from the API)", "", "| scenario | key | type | flow_run_id | task_run_id | description |",
              "| --- | --- | --- | --- | --- | --- |"]
    for scenario, f in facts.items():
        for a in f["artifacts"]:
            lines.append(f"| {scenario} | {a['key']} | {a['type']} | {a['flow_run_id']} | {a['task_run_id']} "
                         f"| {a['description']} |")
    if link_results:
        lines += ["", "## Links followed", ""]
        for link in link_results:
            lines.append(f"- {json.dumps(link)}")
    lines += ["", "## Screenshots", ""]
    for shot in shots:
        lines += [f"### {shot.file}", "", f"{shot.title}  ", f"URL: {shot.url}  ", f"Page title: {shot.page_title}", ""]
        lines += [f"> note: {n}" for n in shot.notes] + ([""] if shot.notes else [])
        lines += ["```text", shot.text.replace("```", "'''"), "```", ""]
    path = os.path.join(out, "tour.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    return path


@dataclass
class TourResult:
    out: str
    runs: list[CliRun]
    facts: dict
    shots: list[Shot]
    findings: dict
    timings: dict
    report: str


def run_tour(out: str, project_dir: str = str(ROOT), uis: tuple[str, ...] = UIS, deployment: bool = True,
             keep_work: bool = False) -> TourResult:
    """The whole tour; everything it starts is stopped before it returns or raises."""
    from playwright.sync_api import sync_playwright

    os.makedirs(out, exist_ok=True)
    for old in Path(out).glob("*.png"):
        old.unlink()
    timings: dict = {}
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="ui-tour-")
    log_path = os.path.join(out, "commands.log")
    open(log_path, "w").close()
    with ExitStack() as stack:
        if not keep_work:
            stack.callback(shutil.rmtree, work, True)
        t = time.monotonic()
        server = PrefectServer(os.path.join(work, "prefect-home"), os.path.join(out, "server.log"))
        stack.callback(server.stop)
        server.start()
        timings["server start"] = time.monotonic() - t
        print(f"ui_tour: Prefect server at {server.url} (PREFECT_HOME {server.home})", flush=True)

        t = time.monotonic()
        runs = run_scenarios(work, server, project_dir, log_path)
        timings["three CLI runs"] = time.monotonic() - t
        facts = read_facts(server.api_url, runs)
        keys = sorted({a["key"] for f in facts.values() for a in f["artifacts"] if a["key"]})

        t = time.monotonic()
        playwright = stack.enter_context(sync_playwright())
        browser = launch_browser(playwright)
        stack.callback(_close_quietly, browser)
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        tour = Tour(page, server.url, out)
        tour.goto("/", notes=[])
        tour.shot("home", "What http://127.0.0.1:N/ opens", [])
        for ui in uis:
            tour_ui(tour, ui, facts, keys)
        timings["browser tour of the runs"] = time.monotonic() - t

        if deployment:
            t = time.monotonic()
            serve = start_serve(work, server, project_dir, os.path.join(out, "serve.log"))
            stack.callback(_stop_group, serve)
            deployment_id = wait_for_deployment(server.api_url, serve)
            if deployment_id:
                for ui in uis:
                    tour_deployment(tour, ui, deployment_id)
            else:
                print("ui_tour: `gender-pipeline serve` made no deployment; see serve.log", flush=True)
            _stop_group(serve)
            timings["deployment (serve + pages)"] = time.monotonic() - t

        timings["total"] = time.monotonic() - started
        link_results = [link for ui in tour.findings.values() for s in ui.values() if isinstance(s, dict)
                        for a in s.get("artifacts", []) for link in a["links"]]
        report = write_tour_md(out, tour.shots, runs, facts, server.url, timings, link_results)
        with open(os.path.join(out, "facts.json"), "w", encoding="utf-8") as handle:
            json.dump({"runs": [r.__dict__ | {"output": r.output[-4000:]} for r in runs], "facts": facts,
                       "findings": tour.findings, "timings": timings}, handle, indent=2, default=str)
        return TourResult(out, runs, facts, tour.shots, tour.findings, timings, report)


def _close_quietly(browser) -> None:
    try:
        browser.close()
    except Exception:  # noqa: BLE001 - the driver may already be gone after Ctrl-C
        pass


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/ui-tour", help="folder for the PNGs and tour.md (default /tmp/ui-tour)")
    parser.add_argument("--project-dir", default=str(ROOT),
                        help="the project whose code the CLI runs (default: this checkout)")
    parser.add_argument("--ui", choices=("v2", "v1", "both"), default="both",
                        help="which Prefect UI to tour: v2 (what / opens), v1, or both (default)")
    parser.add_argument("--no-deployment", action="store_true",
                        help="skip `gender-pipeline serve` and the deployment's pages")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary uploads, lake and PREFECT_HOME")
    args = parser.parse_args(argv)
    if not os.path.exists(CHROMIUM):
        print(f"ui_tour: {CHROMIUM} missing: apt-get install -y chromium", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    uis = UIS if args.ui == "both" else (args.ui,)
    try:
        result = run_tour(os.path.abspath(args.out), os.path.abspath(args.project_dir), uis,
                          deployment=not args.no_deployment, keep_work=args.keep_work)
    except KeyboardInterrupt:
        print("ui_tour: interrupted; server and browser stopped", file=sys.stderr)
        return 130
    print(f"ui_tour: {len(result.shots)} screenshots and {result.report} in {result.timings['total']:.0f} s")
    failed = [r for r in result.runs if r.returncode != 0]
    for run in failed:
        print(f"ui_tour: the {run.scenario} run exited {run.returncode}; see {args.out}/commands.log", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
