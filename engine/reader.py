"""Reading ahead: a thread fetches the photos' bytes in chunks (concurrently on async
stores) and hashes them, a bounded queue ahead of the stages that use them."""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

from gender_pipeline.lake.storage import ObjectInfo, Store
from gender_pipeline.runtime import timeline

_DONE = object()


class ReadAhead:
    """`with ReadAhead(...) as reader: for key, data, sha in reader.items(check): ...`.
    `data` is the bytes, or the error that reading them raised (sha is then None);
    `seconds["read"]` adds the time spent reading. Leaving stops the thread within a chunk
    read (it never writes anything)."""

    def __init__(self, store: Store, objects: list[ObjectInfo], chunk: int, depth: int, seconds: Counter) -> None:
        self.store, self.objects, self.chunk, self.seconds = store, objects, chunk, seconds
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, name="photo-reader", daemon=True)

    def __enter__(self) -> "ReadAhead":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join(timeout=1)

    def items(self, checkpoint: Callable[[], None]) -> Iterator[tuple[str, bytes | BaseException, str | None]]:
        """The photos as they are read; `checkpoint` is called while waiting."""
        while True:
            checkpoint()
            try:
                item = self.queue.get(timeout=0.25)
            except queue.Empty:
                continue
            if item is _DONE:
                return
            key, data, _ = item
            if key is None:  # the reader itself failed
                raise data
            yield item

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.25)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            for start in range(0, len(self.objects), self.chunk):
                if self.stop.is_set():
                    return
                keys = [o.key for o in self.objects[start:start + self.chunk]]
                started = time.perf_counter()
                timeline.mark("first photo read")
                found = [(key, data, None if isinstance(data, BaseException) else hashlib.sha256(data).hexdigest())
                         for key, data in self.store.read_many(keys).items()]
                self.seconds["read"] += time.perf_counter() - started
                for item in found:
                    if not self._put(item):
                        return
        except BaseException as error:  # pragma: no cover - surfaced by the consumer
            self._put((None, error, None))
        finally:
            self._put(_DONE)
