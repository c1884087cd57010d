"""Child processes that cannot outlive the run that started them, and the cores they share.

On Linux the kernel's parent-death signal (prctl PR_SET_PDEATHSIG) ends a child when its
parent dies, SIGKILL included. Worker processes call `die_with_parent` first thing; a
program started by `tied_command` (Prefect's temporary server) has the signal set before
it is exec'd. Elsewhere these are no-ops.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1


def cpu_count() -> int:
    """The cores this process may use (its affinity, which containers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent exits; exit at once when
    the expected parent is already gone (it died before this call)."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:  # pragma: no cover - always allowed
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)


def quiet_worker(parent_pid: int | None = None) -> None:
    """For worker processes: die with the parent, and leave SIGTERM/SIGINT to the parent,
    which stops the run and then ends its workers itself."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def tied_command(argv: list[str], sig: int = signal.SIGTERM) -> list[str]:
    """The command line that runs `argv` (a program and its arguments) so that it receives
    `sig` when the calling process dies."""
    return [sys.executable, "-m", __name__, str(os.getpid()), str(int(sig)), *argv]


def _exec_tied(argv: list[str]) -> None:
    parent, sig, program = int(argv[0]), int(argv[1]), argv[2:]
    die_with_parent(parent, sig)
    os.execv(program[0], program)


if __name__ == "__main__":
    _exec_tied(sys.argv[1:])


def kill_pool(pool: ProcessPoolExecutor) -> None:
    """End a process pool now: its workers are killed, not waited for (a photo being
    decoded may take seconds). Python 3.11 has no public way to do this."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(timeout=5)
