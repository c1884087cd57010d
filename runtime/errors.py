"""Failures a user can fix, and the exit status the CLI gives each (the README's table).

Such a failure ends a run with one line (its traceback goes to the run's logs only) and
the command with its exit status and a message; anything else is a bug and keeps its
traceback (exit 1). Each kind of failure says its own status where it is defined."""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STORAGE = 3
EXIT_EXPECTATIONS = 4
EXIT_LOCKED = 5
EXIT_STOPPED = 6  # cancelled from Prefect; a signal gives 128 + its number (130 Ctrl-C, 143 SIGTERM)


class ExpectedFailure(Exception):
    """A failure the README lists: its exit status, and the words before its message."""

    exit_status = EXIT_FAILED
    prefix = ""


class UsageFailure(ExpectedFailure):
    """Bad input: an argument, a model, a dataset (exit 2)."""

    exit_status = EXIT_USAGE


class StorageFailure(ExpectedFailure):
    """Storage that cannot be reached or read (exit 3)."""

    exit_status = EXIT_STORAGE
    prefix = "storage problem: "


class DataFailure(ExpectedFailure):
    """Data that fails a check: a listing that looks wrong, rows that fail a suite, a
    table that is not ours (exit 4)."""

    exit_status = EXIT_EXPECTATIONS


def expected_failure(error: BaseException) -> tuple[str, int] | None:
    """(the words before its message, the exit status) of a failure a user can fix; None
    for anything else."""
    if isinstance(error, ExpectedFailure):
        return error.prefix, error.exit_status
    if isinstance(error, (FileNotFoundError, PermissionError)):
        return StorageFailure.prefix, EXIT_STORAGE
    return None
