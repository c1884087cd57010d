"""Alerts as code, fired by a real Prefect server: `gender-pipeline alerts` creates the
automations, real nights (a failed one, one ending in Warnings) and a night that never
finishes make the server post to a small HTTP server on 127.0.0.1, which receives each
alert naming the run and its reason."""

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.test_deployment import prefect_server  # noqa: F401 - the fixture
from tests.test_stop import ROOT

WITHIN = 20  # seconds a night has to finish in, here (the default is 4 h)


@pytest.fixture
def webhook():
    """An HTTP server on 127.0.0.1 that keeps every JSON body posted to it."""
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received
    finally:
        server.shutdown()
        server.server_close()


def _cli(env, *argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "gender_pipeline.cli", *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _wait_for(received, count, seconds):
    deadline = time.monotonic() + seconds
    while len(received) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return [r["body"] for r in received]


def test_each_alert_fires_against_a_real_server(prefect_server, webhook, uploads, tmp_path):  # noqa: F811
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Pending, Scheduled
    from prefect.types._datetime import now

    url, received = webhook
    env = prefect_server
    created = _cli(env, "alerts", "--webhook-url", url, "--finish-within", f"{WITHIN}s", "--header", "X-Token: t0k")
    assert created.returncode == 0, created.stderr[-2000:]
    names = [a["name"] for a in json.loads(created.stdout)["alerts"]]
    assert names == ["gender-pipeline: a night failed", "gender-pipeline: a night ended in Warnings",
                     f"gender-pipeline: a night not finished {WITHIN} s after it was due"]
    again = _cli(env, "alerts", "--webhook-url", url, "--finish-within", f"{WITHIN}s", "--header", "X-Token: t0k")
    assert again.returncode == 0, again.stderr[-2000:]
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            assert sorted(a.name for a in client.read_automations()) == sorted(names)  # replaced, not doubled

            # A night that went Pending and never finished (its process hung, or died unseen).
            @flow(name="nightly-scoring")
            def stuck():
                pass

            hung = client.create_flow_run(stuck, name="2026-12-07 a night that hangs", state=Pending())
            # A scheduled night no runner picks up (the serve process is down): it goes Late.
            deployment = client.create_deployment(flow_id=client.create_flow(stuck), name="nightly-scoring")
            unserved = client.create_flow_run_from_deployment(
                deployment, name="2026-12-08 a night nobody runs", state=Scheduled(scheduled_time=now("UTC")))
    time.sleep(2)

    source, _ = uploads
    failed = _cli(env, "score", "--source", str(source), "--output", str(tmp_path / "lake"), "--registry",
                  str(tmp_path / "registry"), "--workers", "0", "--min-new-photos", "1000")
    assert failed.returncode == 4, failed.stderr[-2000:]
    (tmp_path / "empty").mkdir()
    warned = _cli(env, "score", "--source", str(tmp_path / "empty"), "--output", str(tmp_path / "lake2"),
                  "--registry", str(tmp_path / "registry"), "--workers", "0", "--json")
    assert warned.returncode == 0, warned.stderr[-2000:]
    warned_run = json.loads(warned.stdout)["run_id"]

    bodies = _wait_for(received, 4, WITHIN + 90)
    lates = {b["flow_run"]["id"]: b for b in bodies if b["alert"] == names[2]}
    by_alert = {b["alert"]: b for b in bodies}
    assert len(bodies) == 4 and set(by_alert) == set(names) and len(lates) == 2, bodies

    failure = by_alert[names[0]]
    assert failure["reason"].startswith("the night failed: ListingLooksWrong: ") and "fewer than --min-new-photos" \
        in failure["reason"]
    assert failure["flow_run"]["state"] == "Failed" and "/lake" in failure["flow_run"]["name"]

    warning = by_alert[names[1]]
    assert warning["flow_run"]["id"] == warned_run and warning["flow_run"]["state"] == "Warnings"
    assert warning["reason"] == "the night ended in Warnings: 1 warning: the source is empty: no object listed"
    assert warning["flow_run"]["name"].startswith("⚠ 1 warning · ")

    late = lates[str(hung.id)]
    assert late["flow_run"]["name"] == "2026-12-07 a night that hangs"
    assert late["reason"] == f"the night has not finished {WITHIN} s after it was due; it is Pending"
    never = lates[str(unserved.id)]
    assert never["reason"] == f"the night has not finished {WITHIN} s after it was due; it is Late"
    assert all(r["headers"].get("X-Token") == "t0k" and r["path"] == "/alerts" for r in received)
    # The nights that finished in time raised no lateness alert: the two above are the only ones.
    time.sleep(5)
    assert len(received) == 4, [r["body"] for r in received]

    removed = _cli(env, "alerts", "--remove")
    assert removed.returncode == 0 and sorted(json.loads(removed.stdout)["removed"]) == sorted(names)


def test_alerts_need_a_server_they_can_live_on(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # a profile with no API URL
    result = _cli(env, "alerts", "--webhook-url", "http://127.0.0.1:9/hook")
    assert result.returncode == 2 and "alerts live on a Prefect server: set PREFECT_API_URL" in result.stderr
