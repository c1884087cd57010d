"""Prefect's temporary API server for one command, started first thing.

Without a configured `PREFECT_API_URL`, a run needs a Prefect server of its own. Prefect's
client would start one when the flow begins, after this process has imported everything;
starting it here, before the imports, lets it boot on another core while this process
imports Prefect, the flows and the models. It is Prefect's own server app, run the way
Prefect runs its temporary one (uvicorn, the UI off), on 127.0.0.1, tied to this process:
it gets SIGTERM when the command ends, however it ends (SIGKILL included).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from gender_pipeline.runtime.processes import tied_command


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryServer:
    def __init__(self) -> None:
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        prefect_dir = os.path.dirname(importlib.util.find_spec("prefect").submodule_search_locations[0])
        command = [sys.executable, "-m", "uvicorn", "--app-dir", prefect_dir, "--factory",
                   "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "error", "--lifespan", "on"]
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(tied_command(command), env=env, stdin=subprocess.DEVNULL)
        atexit.register(self.stop)

    def use(self) -> str:
        """Point this process's Prefect client (every thread's) and the processes it starts
        at the server; returns its API URL."""
        from prefect.context import refresh_global_settings_context  # lazy: this module starts the server before Prefect is imported

        os.environ["PREFECT_API_URL"] = self.api_url
        refresh_global_settings_context()
        return self.api_url

    def wait(self, timeout: float = 120) -> None:
        """Return once the server answers; RuntimeError if it died or never answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with status {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def configured_api_url() -> str | None:
    """The Prefect API this command is configured to use (environment or profile)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL  # lazy: Prefect's settings, only when no URL is set

    return PREFECT_API_URL.value()
