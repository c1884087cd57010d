"""A night's context: built once when the night starts, handed down to every step and
to every shard (it travels to Dask workers: nothing in it holds a thread or a socket)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date, datetime
from functools import cached_property

from gender_pipeline.lake.lock import LeaseRef
from gender_pipeline.lake.storage import Store, Stores
from gender_pipeline.night.options import NightOptions


@dataclass(frozen=True)
class RunContext:
    """Which night this is (run id, day, when its listing was taken), what it was told
    (its options), which model answers (NAME@VERSION once resolved under the lock) and
    the lease that says the run still holds its output."""

    options: NightOptions
    run_id: str
    day: date
    listed_at: datetime
    model: str
    lease: LeaseRef | None = None

    @classmethod
    def start(cls, options: NightOptions, run_id: str, now: datetime) -> "RunContext":
        return cls(options, run_id, options.scoring_date or now.date(), now, options.model.name)

    def holding(self, lease: LeaseRef) -> "RunContext":
        return replace(self, lease=lease)

    def answering_with(self, model: str) -> "RunContext":
        return replace(self, model=model)

    @cached_property
    def stores(self) -> Stores:
        """Every store of the night, with the storage options set once."""
        return Stores(self.options.where.endpoint_url)

    @property
    def source(self) -> Store:
        return self.stores.at(self.options.where.source)

    @property
    def output(self) -> Store:
        return self.stores.at(self.options.where.output)
