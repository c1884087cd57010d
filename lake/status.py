"""The output at a glance, in columns (nothing per row in Python): the history's files,
rows and rates per day, the users table's users, genders, bands and models, the last
runs and erasures."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gender_pipeline.lake.answers import in_band_order
from gender_pipeline.lake.history import empty_history, history_dataset, published_files
from gender_pipeline.lake.runs import ERASURES, recent_runs
from gender_pipeline.lake.sql import duckdb_session

if TYPE_CHECKING:
    from gender_pipeline.lake.output import OutputState


def output_status(state: "OutputState") -> dict:
    """The history (files, rows, reject and `unknown` rates per day, reasons, models) and
    the users table (users, genders, models), in columns: nothing per row in Python."""
    store = state.store
    history = history_dataset(store)
    with duckdb_session() as con:
        con.register("history", history if history is not None else empty_history())
        days = con.rows("""SELECT dt, count(*) AS rows,
                                 round(avg(CASE WHEN status = 'rejected' THEN 1 ELSE 0 END), 4) AS reject_rate,
                                 round(avg(CASE WHEN gender = 'unknown' THEN 1 ELSE 0 END), 4) AS unknown_rate
                          FROM history GROUP BY dt ORDER BY dt""")
        reasons = con.rows("SELECT reject_reason, count(*) FROM history WHERE reject_reason IS NOT NULL "
                           "GROUP BY ALL ORDER BY 2 DESC, 1")
        models = con.rows("SELECT model_name || '@' || model_version, count(*) FROM history "
                          "WHERE model_name IS NOT NULL GROUP BY ALL ORDER BY 1")
        users_table = state.users.open()
        state.users.view(con, "users", users_table)
        genders = dict(con.rows("SELECT gender, count(*) FROM users GROUP BY ALL"))
        by_model = con.rows("SELECT model_name || '@' || model_version, count(*) FROM users GROUP BY ALL "
                            "ORDER BY 2 DESC, 1")
        bands = dict(con.rows("SELECT age_band, count(*) FROM users WHERE age_band IS NOT NULL GROUP BY ALL"))
        total = sum(n for _, n in by_model)
    runs = recent_runs(store, 10)
    return {
        "output": store.url,
        "production": next((r.get("production") for r in reversed(runs) if r.get("production")), None),
        "runs": runs,
        "erasures": recent_runs(store, 100, ERASURES),
        "files": len(published_files(store)),
        "rows": sum(d[1] for d in days),
        "partitions": [{"dt": str(dt), "rows": n, "reject_rate": float(r), "unknown_rate": float(u)}
                       for dt, n, r, u in days],
        "reject_reasons": {str(k): int(v) for k, v in reasons},
        "models": [{"model": m, "rows": int(n)} for m, n in models],
        "users": {"table": state.users.url, "exists": users_table is not None, "users": int(total),
                  "version": users_table.version() if users_table is not None else None,
                  "feed": next((r.get("users_versions") for r in reversed(runs) if r.get("users_versions")), None),
                  "genders": {g: int(genders.get(g, 0)) for g in ("female", "male", "unknown")},
                  "age_bands": in_band_order(bands),
                  "models": [{"model": m, "users": int(n), "share": round(n / total, 4)} for m, n in by_model]},
    }
