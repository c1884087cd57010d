"""The Prefect side of stopping a run (see runtime.stopping for the plain side).

A run stops on SIGTERM/SIGINT (a worker or runner cancelling it, Kubernetes, systemd,
Ctrl-C) and on a cancel from the Prefect UI or API, which a watcher thread notices within
seconds even when no runner is there to send a signal (a run started from the CLI). The
flow then ends in the Cancelled state with the reason."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from types import SimpleNamespace

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext, TaskRunContext
from prefect.futures import PrefectFuture
from prefect.logging.handlers import APILogHandler
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed, State

from gender_pipeline.runtime.errors import expected_failure
from gender_pipeline.runtime.stopping import STOP, Stop, StopRequested, stop_on_signals


CANCELLED_FROM_PREFECT = "cancelled from Prefect (UI or API)"


class _InARun(logging.Filter):
    """Only records logged inside a flow or task run go to the API (the lock's heartbeat
    and the worker threads log outside any run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def send_logs_to_runs(name: str = "gender_pipeline") -> None:
    """The plain code below the tasks logs with `logging` (it never imports Prefect); its
    records from inside a run go to that run's logs in Prefect as well as to the console,
    as `PREFECT_LOGGING_EXTRA_LOGGERS` would do in every process that runs a flow or a
    shard (a worker's subprocess, a Dask worker) without having to be set there."""
    logger = logging.getLogger(name)
    if any(isinstance(h, APILogHandler) for h in logger.handlers):
        return
    handler = APILogHandler()
    handler.addFilter(_InARun())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


send_logs_to_runs()


@contextmanager
def _watch_for_cancel(stop: Stop, every: float = 2.0) -> Iterator[None]:
    run_id = flow_run.id
    if not run_id:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        with get_client(sync_client=True) as client:
            while not done.wait(every):
                try:
                    state = client.read_flow_run(run_id).state
                except Exception:  # the API may be briefly unreachable; try again
                    continue
                if state is not None and (state.is_cancelling() or state.is_cancelled()):
                    stop.request(CANCELLED_FROM_PREFECT)
                    return

    thread = threading.Thread(target=watch, name="cancel-watcher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=every + 5)


@contextmanager
def stoppable_run() -> Iterator[Stop]:
    """Inside a flow: signals and a cancel from Prefect ask the run to stop."""
    with stop_on_signals(STOP) as stop, _watch_for_cancel(stop):
        yield stop


def retry_unless_stopped(task, task_run, state) -> bool:
    """Prefect retry condition: a task that stopped because the run was asked to stop is
    not retried."""
    error = state.data if isinstance(state.data, BaseException) else None
    return not isinstance(error, StopRequested) and not STOP.requested


def finish_all(futures: list[PrefectFuture], poll: float = 0.2) -> None:
    """Wait until every submitted task has ended (they stop quickly once asked to).

    The wait wakes up every `poll` seconds: a SIGTERM the kernel delivers to another of the
    process's threads (a reader, a pool's thread) is handled by the main thread only when
    it next runs Python code, and an untimed wait would leave the run going until the
    tasks ended by themselves."""
    for future in futures:
        while not _ended(future):
            future.wait(timeout=poll)


def _ended(future: PrefectFuture) -> bool:
    wrapped = getattr(future, "wrapped_future", None)  # thread pool and Dask futures
    return wrapped.done() if wrapped is not None else future.state.is_final()


def _cancelled_in_prefect() -> bool:
    if not flow_run.id:
        return False
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run.id).state
    except Exception:  # the API is unreachable: the signal is all we know
        return False
    return state is not None and (state.is_cancelling() or state.is_cancelled())


def stopped(stop: Stop, what: str) -> State:
    """The final state of a flow that stopped on request: Cancelled, with the reason (a
    signal from a runner or worker that cancels the run is named as the cancel it is)."""
    reason = stop.reason
    if stop.signum is not None and _cancelled_in_prefect():
        reason = f"{CANCELLED_FROM_PREFECT}, {reason}"
    message = f"stopped ({reason}): {what}"
    get_run_logger().warning(message)
    return Cancelled(message=message)


def one_line(error: BaseException) -> str:
    """The error as one line for a state message (a data check's details go to the logs)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {text}"


def failed(error: Exception):
    """The end of a run that failed: for a failure the README lists (runtime.errors), a
    Failed state with its one line (the traceback in the run's logs only, not on the
    console); anything else raises, traceback and all."""
    if expected_failure(error) is None:
        raise error
    get_run_logger().error("%s", one_line(error), exc_info=error, extra={"console": False})
    return Failed(message=one_line(error), data=error)


def _short(url: str) -> str:
    return "/".join(str(url).rstrip("/").split("/")[-2:])


def scoring_run_name() -> str:
    """A scoring run's name from its options: the date, the source and the output, and when
    it started (`2026-11-29 shop-signups/uploads → shop-lake/gender, 02:00 UTC`)."""
    options = flow_run.parameters.get("options")
    if isinstance(options, dict):  # the parameters as they were sent
        options = SimpleNamespace(scoring_date=options.get("scoring_date"),
                                  where=SimpleNamespace(**(options.get("where") or {})))
    now = datetime.now(timezone.utc)
    day = getattr(options, "scoring_date", None) or now.date()
    where = getattr(options, "where", None)
    # The start time too: the runs lists and an artifact key's history tell two runs of a day apart.
    return f"{day} {_short(getattr(where, 'source', '?'))} → {_short(getattr(where, 'output', '?'))}, {now:%H:%M} UTC"


def sent_parameters() -> dict:
    """The parameters this flow run was sent, as the API has them (before validation)."""
    context = FlowRunContext.get()
    return dict(context.flow_run.parameters or {}) if context is not None and context.flow_run is not None else {}


def tag_run(rename: str | None = None, **values: str) -> None:
    """Tag this flow run, e.g. scoring-date:2026-11-29 and model:NAME@VERSION, plus how it
    was started: cli, deployment or schedule; `rename` puts words before its name (the
    runs lists show a run's name, its state's name and its tags, never its message)."""
    if not flow_run.id:
        return
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run.id)
            started_by = ("schedule" if run.auto_scheduled else "deployment") if run.deployment_id else "cli"
            tags = (set(run.tags) | {f"{k.replace('_', '-')}:{v}" for k, v in values.items()}
                    | {f"started-by:{started_by}"})
            # The outcome first: the runs list shows the first tags of a run.
            client.update_flow_run(flow_run.id, tags=sorted(tags, key=lambda t: (not t.startswith("outcome:"), t)),
                                   name=f"{rename} · {run.name}" if rename and rename not in run.name else None)
    except Exception as error:  # tags help people find runs; they never fail one
        get_run_logger().warning("could not tag the flow run: %s", error)
