"""The CPU cost of feeding the GPU path, per photo, on one thread.

For every upload under `--source` (any `{user_id}/{file}` tree), interleaved photo by
photo so that both sides see the same caches and the same load:

* now, a JPEG the device decodes: read the bytes, hash them, read the header (format,
  size, orientation, limits), wrap the bytes as a tensor and batch it. That is all the
  CPU does; the device decodes (`decode_jpeg` on the CPU device is timed apart, as the
  work the GPU takes over);
* now, anything else: read, hash, header, decode with Pillow in a worker and hand the
  working image to the main process through shared memory (written by the worker, copied
  once into a tensor by the main process);
* before: read, hash, decode with Pillow, and hand the working image over by pickling
  (dumps in the worker, loads in the main process), for every photo.

The hand-off is measured between two real processes: a helper decodes the photo, then
sends it pickled through a pipe (as a process pool's reply travels) and, separately,
writes it into a shared-memory slot and sends its shape; both sides' CPU time is added.

It prints milliseconds per photo by kind and stage, the photos per second one core can
feed, the shared-memory hand-off against pickling per non-JPEG photo, and ends with
`cpu_ms_per_jpeg=<x> cpu_ms_per_other=<y>`.

    python benchmarks/bench_gpu_feed.py --source /tmp/uploads/uploads
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import statistics
import sys
import time
import warnings
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from gender_pipeline.runtime import shm  # noqa: E402
from gender_pipeline.faces.decoding import DecodedPhoto, DecodeLimits, Rejection, decode_photo  # noqa: E402
from gender_pipeline.faces.device import GpuFaceFrontEnd  # noqa: E402
from gender_pipeline.faces.headers import inspect  # noqa: E402
from gender_pipeline.engine.prepared import Prepared  # noqa: E402


def clock() -> float:
    return time.thread_time()  # CPU seconds of this thread: what the feed costs a core


def _handoff_helper(conn, limits: DecodeLimits) -> None:
    """The worker's side: decode a photo, then send it both ways, timing its own CPU."""
    while True:
        message = conn.recv()
        if message is None:
            return
        path, slot = message
        with open(path, "rb") as handle:
            decoded = decode_photo(handle.read(), limits)
        if not isinstance(decoded, DecodedPhoto):
            conn.send(None)
            continue
        t0 = clock()
        conn.send_bytes(pickle.dumps(Prepared("k", "u", "h", decoded=decoded), protocol=pickle.HIGHEST_PROTOCOL))
        t1 = clock()
        shm.write(slot, decoded.rgb)
        shape = decoded.rgb.shape
        decoded.rgb = None
        conn.send(Prepared("k", "u", "h", decoded=decoded, shape=shape))
        t2 = clock()
        conn.send((t1 - t0, t2 - t1))


class Handoff:
    """A helper process that hands decoded photos over both ways."""

    def __init__(self, limits: DecodeLimits, slots: shm.SlotPool) -> None:
        import multiprocessing

        self.slots = slots
        self.slot = slots.acquire()
        self.conn, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(target=_handoff_helper, args=(child, limits),
                                                                     daemon=True)
        self.process.start()

    def measure(self, path: str) -> tuple[float, float] | None:
        """(pickled, shared memory): CPU ms of both sides for one photo."""
        self.conn.send((path, self.slot))
        first = clock()  # waiting for the helper to decode is not counted: poll, then time the receive
        self.conn.poll(None)
        t0 = clock()
        blob = self.conn.recv_bytes()
        if blob == pickle.dumps(None):
            return None
        pickle.loads(blob)
        t1 = clock()
        reply = self.conn.recv()
        pixels = torch.from_numpy(self.slots.view(self.slot, reply.shape)).to("cpu", copy=True).permute(2, 0, 1)
        t2 = clock()
        worker_pickle, worker_shm = self.conn.recv()
        del first, pixels
        return ((t1 - t0 + worker_pickle) * 1000, (t2 - t1 + worker_shm) * 1000)

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a {user_id}/{file} tree of uploads")
    parser.add_argument("--limit", type=int, default=0, help="at most this many photos (0: all)")
    parser.add_argument("--batch", type=int, default=32, help="photos per device decode call")
    args = parser.parse_args()

    torch.set_num_threads(1)
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(args.source) for name in names
                   if not name.startswith("."))
    if args.limit:
        paths = paths[:args.limit]
    if not paths:
        raise SystemExit(f"no files under {args.source}")
    limits = DecodeLimits()
    device = GpuFaceFrontEnd.__new__(GpuFaceFrontEnd)  # its JPEG decoder only, on the CPU device
    device.device = "cpu"
    slots = shm.SlotPool(1, shm.slot_bytes(limits.working_side))
    if len(slots) == 0:
        raise SystemExit("no room in /dev/shm for one slot")
    handoff = Handoff(limits, slots)

    ms: dict[str, list[float]] = defaultdict(list)  # "<kind>/<stage>" -> ms per photo
    kinds = defaultdict(int)
    batch: list[torch.Tensor] = []
    pending: list[bytes] = []
    for path in paths:
        # ---- now
        t0 = clock()
        with open(path, "rb") as handle:
            data = handle.read()
        t1 = clock()
        hashlib.sha256(data).hexdigest()
        t2 = clock()
        header = inspect(data, limits)
        t3 = clock()
        if isinstance(header, Rejection):
            kind = "rejected"
            stages = {"read": t1 - t0, "hash": t2 - t1, "header": t3 - t2}
        elif header.device_jpeg:
            kind = "jpeg"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                batch.append(torch.frombuffer(data, dtype=torch.uint8))
            pending.append(data)
            t4 = clock()
            stages = {"read": t1 - t0, "hash": t2 - t1, "header": t3 - t2, "batch": t4 - t3}
            if len(pending) >= args.batch:
                d0 = clock()
                device.decode_jpegs(pending, limits.working_side)
                ms["device-kernels/decode_jpeg+resize"].append((clock() - d0) * 1000 / len(pending))
                pending.clear()
                batch.clear()
        else:
            kind = "other"
            decoded = decode_photo(data, limits)
            t4 = clock()
            stages = {"read": t1 - t0, "hash": t2 - t1, "header": t3 - t2, "decode": t4 - t3}
            if isinstance(decoded, DecodedPhoto):
                measured = handoff.measure(path)
                if measured is not None:
                    pickled, shared = measured
                    stages["handoff"] = shared / 1000
                    ms["handoff/shared-memory"].append(shared)
                    ms["handoff/pickle"].append(pickled)
        kinds[kind] += 1
        for stage, seconds in stages.items():
            ms[f"{kind}/{stage}"].append(seconds * 1000)
        ms[f"{kind}/total"].append(sum(stages.values()) * 1000)

        # ---- before: every photo decoded by Pillow and pickled to the main process
        b0 = clock()
        with open(path, "rb") as handle:
            data = handle.read()
        hashlib.sha256(data).hexdigest()
        decoded = decode_photo(data, limits)
        before = (clock() - b0) * 1000
        if isinstance(decoded, DecodedPhoto):
            measured = handoff.measure(path)  # the pickled reply, both sides, as the pool sent it
            if measured is not None:
                before += measured[0]
                ms[f"before-{kind}/handoff-pickled"].append(measured[0])
        ms[f"before-{kind}/total"].append(before)
    if pending:
        d0 = clock()
        device.decode_jpegs(pending, limits.working_side)
        ms["device-kernels/decode_jpeg+resize"].append((clock() - d0) * 1000 / len(pending))
    handoff.close()
    slots.close()

    def mean(name: str) -> float:
        values = ms.get(name)
        return statistics.fmean(values) if values else float("nan")

    print(f"{len(paths)} uploads under {args.source}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    print("CPU milliseconds per photo, one thread (thread CPU time):")
    for name in sorted(ms):
        print(f"  {name:38s} {mean(name):8.3f}")
    jpeg_now, jpeg_before = mean("jpeg/total"), mean("before-jpeg/total")
    other_now, other_before = mean("other/total"), mean("before-other/total")
    share = kinds["jpeg"] / max(1, kinds["jpeg"] + kinds["other"])
    mixed_now = share * jpeg_now + (1 - share) * other_now
    mixed_before = share * jpeg_before + (1 - share) * other_before
    print(f"JPEG the device decodes: {jpeg_now:.2f} ms of CPU now vs {jpeg_before:.2f} ms before "
          f"({jpeg_before / jpeg_now:.1f}x less); one core feeds {1000 / jpeg_now:,.0f} JPEG photos/s "
          f"(16 cores: {16000 / jpeg_now:,.0f}/s)")
    print(f"other photos: {other_now:.2f} ms now vs {other_before:.2f} ms before; hand-off (both processes) "
          f"{mean('handoff/shared-memory'):.2f} ms through shared memory vs {mean('handoff/pickle'):.2f} ms pickled "
          f"through a pipe")
    print(f"this mix ({share:.0%} device JPEG): {mixed_now:.2f} ms vs {mixed_before:.2f} ms a photo; one core feeds "
          f"{1000 / mixed_now:,.0f} photos/s vs {1000 / mixed_before:,.0f} before "
          f"({mixed_before / mixed_now:.1f}x)")
    print(f"device kernels run on the CPU here (the GPU's work, apart): "
          f"{mean('device-kernels/decode_jpeg+resize'):.2f} ms per JPEG")
    print(f"cpu_ms_per_jpeg={jpeg_now:.3f} cpu_ms_per_other={other_now:.3f}")


if __name__ == "__main__":
    main()
