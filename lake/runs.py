"""What each scoring run of an output saw and did, kept beside the dataset.

One small JSON record per completed run, `{output}/_runs/{listed_at}-{run_id}.json`
(readers of the dataset skip names starting with `_`). Later runs read the last few: to
show a trend, and to notice a source that suddenly lists far fewer photos than before
(a wrong prefix looks like a quiet night otherwise).
"""

from __future__ import annotations

import json
from datetime import datetime

from gender_pipeline.lake.storage import Store, with_retries

FOLDER = "_runs"
ERASURES = "_erasures"  # one record per `forget` call: when, how many users, what it rewrote (no ids)


# A night's outcome: one word, the same in the run record, the trend, `status`, the
# summary, the flow run's tag (outcome:WORD) and its final state's name (capitalised).
OUTCOMES = ("completed", "warnings", "failed", "cancelled")
FINISHED = ("completed", "warnings")  # the night did its work (with warnings or without)


def completed(record: dict) -> bool:
    """A night that did its work, with or without warnings (records written before
    outcomes were kept did)."""
    return record.get("outcome", "completed") in FINISHED


def erasure_counts(records: list[dict]) -> tuple[int, int]:
    """(users erased, ids that matched nothing) over erasure records (records written
    before the two were kept count every id asked as erased)."""
    erased = sum(int(r.get("erased", r.get("users", 0))) for r in records)
    return erased, sum(int(r.get("unmatched", 0)) for r in records)


def record_run(store: Store, record: dict, folder: str = FOLDER) -> str:
    """Write one run's record (atomically); `record` has at least run_id and listed_at."""
    stamp = datetime.fromisoformat(str(record["listed_at"])).strftime("%Y%m%dT%H%M%S")
    key = f"{folder}/{stamp}-{record['run_id']}.json"
    store.write_atomic(key, json.dumps(record, indent=1, default=str).encode())
    return key


def recent_runs(store: Store, count: int = 10, folder: str = FOLDER) -> list[dict]:
    """The last `count` runs' records, oldest first (an empty list before the first run)."""
    try:
        keys = sorted(o.key for o in store.list_objects(folder) if o.key.endswith(".json")
                      and not o.key.rsplit("/", 1)[-1].startswith(("_", ".")))
    except FileNotFoundError:
        return []
    records = []
    for key in keys[-count:]:
        try:
            records.append(json.loads(with_retries(lambda k=key: store.read(k), f"reading {key}")))
        except (FileNotFoundError, ValueError):  # removed or being written: skip it
            continue
    return records
