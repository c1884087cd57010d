"""Overhead of mapping shards over a local Dask cluster against one process, same photos,
same machine, same run; and whether both give the same rows.

    python benchmarks/bench_dask.py --uploads /tmp/bench --count 200
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", required=True, help="folder made by make_uploads.py")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--dask-workers", type=int, default=2)
    args = parser.parse_args()

    import pandas as pd
    from prefect.server.api.server import SubprocessASGIServer
    from prefect_dask import DaskTaskRunner

    from benchmarks.bench_scaling import build_source
    from gender_pipeline.flows.scoring import nightly_scoring
    from gender_pipeline.night.options import NightOptions

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # the flow and the Dask workers report here
    work = tempfile.mkdtemp(prefix="bench-dask-")
    source, registry = os.path.join(work, "src"), os.path.join(work, "registry")
    build_source(os.path.join(args.uploads, "uploads"), args.count, source)
    nightly_scoring(NightOptions.from_flat(dict(source=os.path.join(work, "src"), output=os.path.join(work, "warm"), registry=registry,
                    max_photos=1)))  # registry and server warm for both contenders

    started = time.perf_counter()
    nightly_scoring(NightOptions.from_flat(dict(source=source, output=os.path.join(work, "one"), registry=registry)))
    one = time.perf_counter() - started

    import dask

    dask.config.set({"distributed.worker.daemon": False})  # each worker runs its own decoder process
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": args.dask_workers, "threads_per_worker": 1,
                                            "processes": True, "host": "127.0.0.1", "dashboard_address": None})
    started = time.perf_counter()
    summary = nightly_scoring.with_options(task_runner=runner)(NightOptions.from_flat(dict(
        source=source, output=os.path.join(work, "dask"), registry=registry, workers=1,
        shard_size=max(1, args.count // (2 * args.dask_workers)))))
    dask = time.perf_counter() - started

    columns = ["photo_key", "status", "reject_reason", "gender", "p_male", "face_count"]
    a = pd.read_parquet(os.path.join(work, "one",
                                     "predictions"))[columns].sort_values("photo_key").reset_index(drop=True)
    b = pd.read_parquet(os.path.join(work, "dask",
                                     "predictions"))[columns].sort_values("photo_key").reset_index(drop=True)
    same = a.equals(b) or bool(((a.p_male - b.p_male).abs().fillna(0) < 1e-6).all() and
                               a.drop(columns="p_male").equals(b.drop(columns="p_male")))
    print(f"photos: {args.count}; rows one process {len(a)}, dask {len(b)} in {summary['shards']} shards; "
          f"same rows: {same}")
    print(f"one process (2 decode workers): {one:.1f} s, {args.count / one:.2f} photos/s")
    print(f"local Dask, {args.dask_workers} workers x 1 decode worker: {dask:.1f} s, {args.count / dask:.2f} photos/s")
    print(f"Dask / one process time: {dask / one:.2f}x")
    shutil.rmtree(work, ignore_errors=True)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
