"""The Prefect side of stopping a run (see runtime.stopping for the plain side).

A run stops on SIGTERM/SIGINT (a worker or runner cancelling it, Kubernetes, systemd,
Ctrl-C) and on a cancel from the Prefect UI or API, which a watcher thread notices within
seconds even when no runner is there to send a signal (a run started from the CLI). The
flow then ends in the Cancelled state with the reason."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Cancelled, State

from gender_pipeline.runtime.stopping import STOP, Stop, StopRequested, stop_on_signals


CANCELLED_FROM_PREFECT = "cancelled from Prefect (UI or API)"


@contextmanager
def _watch_for_cancel(stop: Stop, every: float = 2.0) -> Iterator[None]:
    run_id = flow_run.id
    if not run_id:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        from prefect.client.orchestration import get_client

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
    from prefect.client.orchestration import get_client

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


def expected_failure(error: BaseException) -> bool:
    """A failure the README lists with its exit status (a wrong listing, a failed data check,
    storage, a locked output, a foreign table, a bad model or argument): it ends the run with
    one line; its traceback goes to the run's logs only."""
    from gender_pipeline.lake.tables import TableError
    from gender_pipeline.night.checks import ExpectationsFailed
    from gender_pipeline.lake.lock import OutputLocked
    from gender_pipeline.faces.model_files import ModelFetchError, ModelFileMissing
    from gender_pipeline.lake.runs import ListingLooksWrong
    from gender_pipeline.lake.storage import StorageError
    from gender_pipeline.models.registry import RegistryError

    return isinstance(error, (ListingLooksWrong, ExpectationsFailed, StorageError, OutputLocked, TableError,
                              RegistryError, ModelFileMissing, ModelFetchError, FileNotFoundError, PermissionError))


def one_line(error: BaseException) -> str:
    """The error as one line for a state message (a data check's details go to the logs)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {text}"


def failed(error: Exception):
    """The end of a run that failed: for an expected failure, a Failed state with its one
    line (the traceback in the run's logs only, not on the console); anything else raises,
    traceback and all."""
    from prefect.states import Failed

    if not expected_failure(error):
        raise error
    get_run_logger().error("%s", one_line(error), exc_info=error, extra={"console": False})
    return Failed(message=one_line(error), data=error)


def resolved_model(registry: str | None, model: str, endpoint_url: str | None) -> str:
    """NAME@VERSION of the model `model` resolves to (the production alias, else the
    shipped network), for reports and tags; `model` itself when it cannot be resolved."""
    from gender_pipeline.lake.storage import storage_options
    from gender_pipeline.models.registry import ModelRef, Registry

    try:
        name, version = Registry(registry, storage_options(endpoint_url)).resolve(ModelRef.parse(model))
    except Exception:  # a report must not fail the run; loading the model will say why
        return model
    return f"{name}@{version}"


def _short(url: str) -> str:
    return "/".join(str(url).rstrip("/").split("/")[-2:])


def scoring_run_name() -> str:
    """A scoring run's name from its parameters: the date, the source and the output."""
    from datetime import datetime, timezone

    parameters = flow_run.parameters
    day = parameters.get("scoring_date") or datetime.now(timezone.utc).date()
    return f"{day} {_short(parameters.get('source', '?'))} → {_short(parameters.get('output', '?'))}"


def tag_run(**values: str) -> None:
    """Tag this flow run, e.g. scoring-date:2026-11-29 and model:NAME@VERSION, plus how it
    was started: cli, deployment or schedule."""
    from prefect.client.orchestration import get_client

    if not flow_run.id:
        return
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run.id)
            started_by = ("schedule" if run.auto_scheduled else "deployment") if run.deployment_id else "cli"
            tags = set(run.tags) | {f"{k.replace('_', '-')}:{v}" for k, v in values.items()} | {f"started-by:{started_by}"}
            # The outcome first: the runs list shows the first tags of a run.
            client.update_flow_run(flow_run.id, tags=sorted(tags, key=lambda t: (not t.startswith("outcome:"), t)))
    except Exception as error:  # tags help people find runs; they never fail one
        get_run_logger().warning("could not tag the flow run: %s", error)
