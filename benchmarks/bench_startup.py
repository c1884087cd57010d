"""How long a night takes to start: `gender-pipeline score` on one photo, run as a user runs
it (the console script, no PREFECT_API_URL, so with its temporary Prefect server), timed
from the command's start to the first photo read, the first answer and the end.

    python benchmarks/bench_startup.py --runs 3 [--cli PATH/TO/gender-pipeline] [--code DIR]

"cold" runs after the page cache is dropped (root only; said when not possible), "warm"
runs follow each other. The first read is seen by a sitecustomize hook on
`Store.read_many` (so any version of the code can be timed: `--code` puts
another checkout first on the path); GENDER_PIPELINE_TIMELINE=1 adds the run's own
milestones where the code has them (core/timeline.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HOOK = '''
import os, sys, time
_T0 = float(os.environ["BENCH_T0"])


class _Hook:
    def find_spec(self, name, path, target=None):
        if name not in ("core.storage", "gender_pipeline.lake.storage"):  # before and after the namespace
            return None
        sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            read_many = module.Store.read_many

            def traced(self, keys):
                if not getattr(traced, "seen", False):
                    traced.seen = True
                    print(f"bench: first photo read {time.time() - _T0:.3f}", file=sys.stderr, flush=True)
                return read_many(self, keys)

            module.Store.read_many = traced

        loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Hook())
'''


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def one_run(cli: str, source: str, work: str, hook_dir: str, code: str | None) -> dict:
    output = os.path.join(work, "lake")
    shutil.rmtree(output, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(GENDER_PIPELINE_TIMELINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", GX_ANALYTICS_ENABLED="False",
               PYTHONPATH=os.pathsep.join(p for p in (hook_dir, code) if p))
    env["BENCH_T0"] = f"{time.time():.6f}"
    started = time.perf_counter()
    done = subprocess.run([cli, "score", "--source", source, "--output", output, "--registry",
                           os.path.join(work, "registry")], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    marks = {"end": wall}
    for line in done.stderr.splitlines():
        if line.startswith("bench: first photo read "):
            marks["first photo read"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("timeline: "):
            event, seconds = line[len("timeline: "):].rsplit(" ", 1)
            marks.setdefault(event, float(seconds))
    return marks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="warm runs (after one cold run)")
    parser.add_argument("--cli", default=os.path.join(os.path.dirname(sys.executable), "gender-pipeline"))
    parser.add_argument("--code", default=None, help="another checkout to time (first on the path)")
    args = parser.parse_args()

    from gender_pipeline import samples

    work = tempfile.mkdtemp(prefix="gp-startup-")
    hook_dir = os.path.join(work, "hook")
    os.makedirs(hook_dir)
    with open(os.path.join(hook_dir, "sitecustomize.py"), "w") as handle:
        handle.write(HOOK)
    source = os.path.join(work, "uploads")
    samples.write_tree(source, {"u1/me.jpg": samples.face_variants()["baseline.jpg"]})
    one_run(args.cli, source, work, hook_dir, args.code)  # the registry and model caches, once
    cold = drop_page_cache()
    runs = [("cold" if cold else "first", one_run(args.cli, source, work, hook_dir, args.code))]
    runs += [("warm", one_run(args.cli, source, work, hook_dir, args.code)) for _ in range(args.runs)]
    if not cold:
        print("(the page cache could not be dropped: not root; the first run is not cold)")
    events = []
    for _, marks in runs:
        events += [e for e in marks if e not in events]
    order = sorted(events, key=lambda e: statistics.median(m[e] for _, m in runs if e in m))
    print(f"seconds since the command started ({args.cli}{', code ' + args.code if args.code else ''}):")
    print(f"  {'milestone':<34}" + "".join(f"{label:>8}" for label, _ in runs) + "  median(warm)")
    for event in order:
        values = [m.get(event) for _, m in runs]
        warm = [v for (label, _), v in zip(runs, values) if label == "warm" and v is not None]
        print(f"  {event:<34}" + "".join(f"{v:>8.2f}" if v is not None else f"{'—':>8}" for v in values)
              + (f"  {statistics.median(warm):>8.2f}" if warm else ""))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
