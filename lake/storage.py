"""Object storage through fsspec: one code path for file://, s3:// and memory://."""

from __future__ import annotations

import logging
import os
import posixpath
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar

import fsspec

from gender_pipeline.lake.keys import check_user_id
from gender_pipeline.runtime.errors import StorageFailure, UsageFailure

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors worth a retry: connection trouble and throttling, not "no such key".
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, FileExistsError, PermissionError,
                                                     IsADirectoryError, NotADirectoryError)
# botocore/aiohttp errors that are not OSError subclasses, by class name (no import needed).
TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                   "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError",
                   "ClientOSError", "ResponseStreamingError", "IncompleteReadError"}
CREDENTIAL_NAMES = {"NoCredentialsError", "PartialCredentialsError", "NoRegionError"}


def _kind(error: BaseException) -> str:
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & CREDENTIAL_NAMES:
        return "credentials"
    if isinstance(error, PERMANENT_ERRORS):
        return "permanent"
    if isinstance(error, TRANSIENT_ERRORS) or names & TRANSIENT_NAMES:
        return "transient"
    return "other"


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


class UserIdRefused(UsageFailure, ValueError):
    """A user id the upload key rule cannot produce (exit 2)."""


class StorageError(StorageFailure, RuntimeError):
    """Storage could not be reached or read. `transient` errors may pass if tried later."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry a task only for storage trouble that may pass."""
    error = state.data if isinstance(state.data, BaseException) else None
    return isinstance(error, StorageError) and error.transient


def with_retries(action: Callable[[], T], what: str, attempts: int = 4, backoff: float = 0.5) -> T:
    """Run `action`, retrying transient storage errors with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as error:
            kind = _kind(error)
            if kind == "credentials":
                raise StorageError(f"{what}: no usable credentials ({error}); set AWS_ACCESS_KEY_ID/"
                                   f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE", transient=False) from error
            if kind != "transient":
                raise
            if attempt == attempts:
                raise StorageError(f"{what} failed after {attempts} attempts: {error}") from error
            delay = backoff * 2 ** (attempt - 1)
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, error, attempt, attempts - 1, delay)
            _sleep(delay)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store root, '/'-separated
    size: int
    modified: datetime | None


def modified_time(info: dict) -> datetime | None:
    """Modification time of an fsspec info dict, whatever the backend calls it."""
    for field in ("LastModified", "mtime", "last_modified", "created", "updated"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, tz=timezone.utc)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return None


class Store:
    """A folder of objects at an fsspec URL (a plain path works too)."""

    def __init__(self, url: str, options: dict | None = None) -> None:
        self.url = url.rstrip("/") or url
        self.options = dict(options or {})
        self.fs, root = fsspec.core.url_to_fs(url, **self.options)
        self.root = root.rstrip("/")

    @property
    def endpoint_url(self) -> str | None:
        """The S3-compatible endpoint this store talks to (its options', else $AWS_ENDPOINT_URL)."""
        return (self.options.get("client_kwargs") or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")

    @property
    def region(self) -> str:
        """The S3 region: $AWS_REGION, $AWS_DEFAULT_REGION, else us-east-1."""
        return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    @property
    def protocol(self) -> str:
        protocol = self.fs.protocol
        return protocol[0] if isinstance(protocol, (tuple, list)) else protocol

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def key_of(self, path: str) -> str:
        path = path.rstrip("/")
        prefix = self.root + "/"
        if not path.startswith(prefix):
            raise ValueError(f"{path!r} is not under {self.root!r}")
        return path[len(prefix):]

    def exists(self) -> bool:
        return with_retries(lambda: self.fs.exists(self.root), f"checking {self.url}")

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object below the root (recursively), sorted by key."""
        target = self.path(prefix)

        def find() -> dict:
            self.fs.invalidate_cache()
            return self.fs.find(target, detail=True, withdirs=False)

        found = with_retries(find, f"listing {self.url}")
        objects = []
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            objects.append(ObjectInfo(self.key_of(path), int(info.get("size") or 0), modified_time(info)))
        objects.sort(key=lambda o: o.key)
        return objects

    def read_many(self, keys: Iterable[str]) -> dict[str, bytes | BaseException]:
        """Read many objects at once (concurrently on async stores such as s3fs).

        Objects that still fail after retries come back as the exception, so one
        unreadable photo does not stop the others.
        """
        keys = list(keys)
        paths = {self.path(k): k for k in keys}
        try:
            raw = with_retries(lambda: self.fs.cat(list(paths), on_error="return"),
                               f"reading {len(keys)} objects from {self.url}")
        except StorageError as error:
            return {k: error for k in keys}
        out: dict[str, bytes | BaseException] = {}
        for path, key in paths.items():
            value = raw.get(path, FileNotFoundError(path))
            if isinstance(value, BaseException) and not isinstance(value, PERMANENT_ERRORS):
                try:  # one more careful try, alone, for the objects that failed
                    value = with_retries(lambda p=path: self.fs.cat_file(p), f"reading {key}")
                except (StorageError, *PERMANENT_ERRORS) as error:
                    value = error
            out[key] = value
        return out

    def read(self, key: str) -> bytes:
        return with_retries(lambda: self.fs.cat_file(self.path(key)), f"reading {key}")

    def write_atomic(self, key: str, data: bytes, before_move: Callable[[], None] | None = None) -> str:
        """Write under a hidden temporary name, then move into place.

        Readers (pyarrow, pandas, DuckDB, Spark) skip names starting with '_' or '.',
        so they never see a partial file; on S3 the final object appears whole.
        `before_move` runs between the two: when it raises, the temporary is removed and
        nothing is published.
        """
        final = self.path(key)
        directory, name = posixpath.split(final)
        temp = f"{directory}/_tmp-{name}"
        with_retries(lambda: self.fs.makedirs(directory, exist_ok=True), f"creating {directory}")
        self._write_temporary(temp, data)
        if before_move is not None:
            try:
                before_move()
            except BaseException:
                with_retries(lambda: self.fs.rm_file(temp), f"removing {temp}")
                raise
        with_retries(lambda: self.fs.mv(temp, final), f"publishing {final}")
        return final

    def _write_temporary(self, temp: str, data: bytes) -> None:
        with_retries(lambda: self.fs.pipe_file(temp, data), f"writing {temp}")

    def full_url(self, key: str) -> str:
        path = self.path(key)
        return path if self.protocol in ("file", "local") else f"{self.protocol}://{path}"


def read_lines(url: str, options: dict | None = None) -> list[tuple[int, str]]:
    """The non-empty lines of a text file at a path or URL, stripped, with their line
    numbers (a line that starts with `#` is a comment); `-` is standard input. A missing
    file is a storage error that names it."""
    if url == "-":
        text = sys.stdin.read()
    else:
        fs, path = fsspec.core.url_to_fs(url, **(options or {}))
        try:
            text = with_retries(lambda: fs.cat_file(path), f"reading {url}").decode("utf-8")
        except (FileNotFoundError, IsADirectoryError):
            raise StorageError(f"{url} not found", transient=False) from None
        except UnicodeDecodeError:
            raise StorageError(f"{url} is not a UTF-8 text file", transient=False) from None
    lines = ((number, line.strip()) for number, line in enumerate(text.splitlines(), 1))
    return [(number, line) for number, line in lines if line and not line.startswith("#")]


@dataclass(frozen=True)
class Stores:
    """Where a run or a command reads and writes: every store it opens gets the same
    storage options, set once (an S3-compatible endpoint such as MinIO, Ceph or moto; none
    for AWS and local files)."""

    endpoint_url: str | None = None

    @property
    def options(self) -> dict:
        """fsspec's options for these stores."""
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}} if self.endpoint_url else {}

    def at(self, url: str) -> Store:
        return Store(url, self.options)

    def user_ids(self, url: str) -> list[str]:
        """The user ids of a text file at `url`, one a line (see read_lines): an id the
        upload key rule cannot produce is refused with its line number."""
        ids = []
        for number, line in read_lines(url, self.options):
            try:
                ids.append(check_user_id(line))
            except ValueError as error:
                raise UserIdRefused(f"{url}, line {number}: {error}") from None
        return ids
