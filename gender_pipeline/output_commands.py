"""The commands on an output: forget, compact, rebuild-users, status. They read and write
the lake only (no Prefect, no torch): parse, call, print."""

from __future__ import annotations

import argparse
import json
import os
import sys

from gender_pipeline.lake.erasure import forget as erase_users
from gender_pipeline.lake.listing import ListingSpec
from gender_pipeline.lake.output import OutputState, compact_output
from gender_pipeline.lake.rebuild import RebuildOptions, rebuild_users as rebuild
from gender_pipeline.lake.runs import recent_runs
from gender_pipeline.lake.status import output_status
from gender_pipeline.lake.storage import StorageError, Store, Stores
from gender_pipeline.night.render import render_status
from gender_pipeline.night.words import plural
from gender_pipeline.runtime.errors import EXIT_USAGE


def _output(args: argparse.Namespace) -> Store:
    """The output store, which must hold what `score` writes: a mistyped --output is a
    storage error (exit 3) that names it, not an empty result."""
    store = Stores(args.endpoint_url).at(args.output)
    if not store.exists() or not any(store.fs.exists(store.path(k)) for k in ("predictions", "users", "_state")):
        raise StorageError(f"{args.output} holds no gender-pipeline output (no predictions/, users/ or _state/); "
                           f"check --output", transient=False)
    return store


def forget(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    stores = Stores(args.endpoint_url)
    ids = list(args.user_id) + (stores.user_ids(args.users_from) if args.users_from else [])
    if not ids:
        print("gender-pipeline: forget needs --user-id or --users-from", file=sys.stderr)
        return EXIT_USAGE
    store = _output(args)
    source_url = args.source or next((r.get("source") for r in reversed(recent_runs(store)) if r.get("source")), None)
    if not source_url:
        print("gender-pipeline: forget needs --source: no run of this output recorded where its photos are",
              file=sys.stderr)
        return EXIT_USAGE
    source = stores.at(source_url)
    if not source.exists():
        raise StorageError(f"source {source_url} does not exist", transient=False)
    report = erase_users(OutputState(store), ids, source, f"forget-{os.getpid()}", args.lock_wait)
    if report.unmatched:
        shown = ", ".join(report.unmatched[:10]) + (f" and {len(report.unmatched) - 10} more"
                                                     if len(report.unmatched) > 10 else "")
        print(f"gender-pipeline: warning: {plural(len(report.unmatched), 'user id')} matched nothing in the "
              f"history, the tables or {source_url} ({shown}): check the ids. Their tombstones were written all "
              f"the same.", file=sys.stderr)
    print(json.dumps({"users": report.users, "erased_at": report.erased_at.isoformat(),
                      "rows_removed": report.rows_removed, "history_files_read": report.files_read,
                      "history_files_rewritten": report.files_rewritten,
                      "history_files_deleted": report.files_deleted, "photo_state_rows_removed": report.photos_removed,
                      "users_table_rows_removed": report.users_removed, "files_vacuumed": report.vacuumed,
                      "change_data_files_removed": report.change_data_removed,
                      "change_data_whole_from_version": report.change_data_from,
                      "seconds": round(report.seconds, 3), "source": source_url,
                      "source_objects": report.source_keys, "unmatched_user_ids": report.unmatched,
                      "note": "the source objects above are the shop's to delete; later runs never read them"},
                     indent=2))
    return 0


def compact(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    result = compact_output(_output(args), f"compact-{os.getpid()}", args.retention_hours, args.lock_wait)
    print(json.dumps(result, indent=2))
    return 0


def rebuild_users(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    stores = Stores(args.endpoint_url)
    state = OutputState(stores.at(args.output))
    excluded = tuple(stores.user_ids(args.exclude_users)) if args.exclude_users else ()
    photos, users = rebuild(state, stores.at(args.source), ListingSpec.parse(args.listing), excluded,
                            RebuildOptions(f"rebuild-users-{os.getpid()}", args.lock_wait, args.replace))
    print(json.dumps({"photos": photos, "users": users, "table": state.users.url}, indent=2))
    return 0


def status(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    found = output_status(OutputState(_output(args)))
    print(json.dumps(found, indent=2, default=str) if args.json else render_status(found))
    return 0
