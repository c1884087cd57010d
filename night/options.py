"""A night's options: one pydantic model, grouped the way a person looks for them.

The nightly-scoring flow takes it as its one parameter; the Prefect UI draws its form
from it, `gender-pipeline score` and `serve` draw their flags from it, and
deployments/prefect.yaml is held against it by a test. Adding an option is one field
here (its type, default, description and, where it differs from the field's name, its
flag) and its test. What can be refused before anything runs is refused here: an empty
or whitespace location, a URL of an unknown scheme, an output inside the source, a
malformed model name, a listing method that does not exist.

Earlier versions took the same options as flat parameters (`source`, `output`,
`batch_size`, …); `NightOptions.from_flat` reads those (see docs/operating.md).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

from gender_pipeline.engine.engine import ScoringOptions
from gender_pipeline.faces.decoding import DecodeLimits
from gender_pipeline.lake.answers import ModelRef, PRODUCTION_MODEL
from gender_pipeline.lake.listing import ListingSpec
from gender_pipeline.lake.locations import File, Folder, check_endpoint
from gender_pipeline.lake.lock import LEASE_SECONDS
from gender_pipeline.lake.photo_state import REFRESH_BUDGET

DEVICES = ("auto", "cpu", "cuda")
SHARD_SIZE = 2000
# A share measured on fewer photos moves by several points from night to night by chance alone
# (its standard error is 5 points at 100): no alarm rests on fewer.
ALARM_MIN_PHOTOS = 100


@dataclass(frozen=True)
class Flag:
    """How a field shows on the command line, where it is not `--{field-name}`: its flag,
    its name among the flat parameters of earlier versions, and an environment variable
    that gives the CLI's default."""

    name: str | None = None
    flat: str | None = None
    env: str | None = None
    metavar: str | None = None


def check_model(text: str) -> str:
    ModelRef.parse(text)
    return text


def check_file_links(text: str) -> str:
    if text in ("none", "presigned"):
        return text
    if not text.startswith("https://"):
        raise ValueError(f"file links are none, presigned, or an https:// template, got {text!r}")
    try:
        text.format(url="u", bucket="b", key="k")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"a file-links template may use {{url}}, {{bucket}} and {{key}} only, got {text!r}") from error
    return text


def check_listing(text: str) -> str:
    ListingSpec.parse(text)
    return text


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- the groups ---------------------------------------------------------------------------------

class Where(_Group):
    """Where the photos are, where the answers go, and where the models live."""

    source: Annotated[Folder, Field(description="Where the uploads are: a path or fsspec URL "
                                                  "(s3://bucket/prefix) holding {user_id}/{file name} objects.")]
    output: Annotated[Folder, Field(description="Where the answers go: OUTPUT/predictions/ (the history), "
                                                  "OUTPUT/users/ (one answer per user) and the state beside them.")]
    registry: Annotated[Folder | None, Field(description="The model registry (path or URL); default "
                                                           "$GENDER_PIPELINE_REGISTRY or ~/.gender-pipeline/registry.")
                        ] = None
    endpoint_url: Annotated[str | None, AfterValidator(check_endpoint),
                            Field(description="An S3-compatible endpoint (MinIO, Ceph); default AWS "
                                              "(the CLI's default: $AWS_ENDPOINT_URL)."),
                            Flag(env="AWS_ENDPOINT_URL")] = None
    file_links: Annotated[str, AfterValidator(check_file_links),
                          Field(description="Links to the written files in the run's artifacts: none (the URLs as "
                                            "text), presigned (https URLs the store signs, e.g. S3), or an https:// "
                                            "template with {url}, {bucket} and {key} (a storage console).")] = "none"


class ModelChoice(_Group):
    """Which model answers, and how sure it must be."""

    model_config = ConfigDict(title="Model")

    name: Annotated[str, AfterValidator(check_model),
                    Field(description="production (the model production points at, else the shipped dlib network), "
                                      "NAME (its production version) or NAME@VERSION."),
                    Flag(name="--model", flat="model")] = PRODUCTION_MODEL
    abstain_threshold: Annotated[float | None, Field(ge=0.5, le=1.0, description="Confidence under which gender is "
                                                     "'unknown'; default the model card's."),
                                 Flag(name="--abstain-below")] = None


class Compute(_Group):
    """Where and how the model and the face front end run."""

    device: Annotated[Literal["auto", "cpu", "cuda"],
                      Field(description="Where the model runs: auto (a GPU when there is one), cpu or cuda.")] = "auto"
    batch_size: Annotated[PositiveInt | None, Field(description="Faces per model call; default 64 on a CPU, sized "
                                                                "from free memory on a GPU.")] = None
    workers: Annotated[NonNegativeInt | None, Field(description="Decoding processes; default one per core, 0 decodes "
                                                                "in the run's own process.")] = None
    front_end: Annotated[Literal["auto", "cpu", "gpu"],
                         Field(description="Where faces are found and aligned: auto (the GPU when the model runs on "
                                           "one), cpu (worker processes) or gpu (batched on the device).")] = "auto"
    gpu_decode: Annotated[bool, Field(description="Decode plain JPEGs on the GPU (nvJPEG).")] = False
    compile: Annotated[bool, Field(description="torch.compile the model (trained models on a GPU).")] = False
    shard_size: Annotated[PositiveInt, Field(description="Photos per shard: scored, checked and published as one "
                                                         "Parquet file.")] = SHARD_SIZE


class Limits(_Group):
    """What an upload and a night may be."""

    max_bytes: Annotated[PositiveInt, Field(description="Largest upload accepted, in bytes.")] = \
        DecodeLimits.max_bytes
    max_pixels: Annotated[PositiveInt, Field(description="Most pixels accepted.")] = DecodeLimits.max_pixels
    max_photos: Annotated[PositiveInt | None, Field(description="Photos per run, oldest first; the rest wait for the "
                                                                "next run (default: all).")] = None


class Guards(_Group):
    """What stops a night before it reads anything, and how it shares the output."""

    min_new_photos: Annotated[NonNegativeInt, Field(description="Fail the run (nothing scored) when fewer new photos "
                                                                "are listed: a guard against a wrong source prefix "
                                                                "(0: off).")] = 0
    max_listing_drop: Annotated[float, Field(ge=0.0, le=1.0, description="Fail the run when the source lists fewer "
                                             "objects than this share less than the last completed run (0.9: under "
                                             "10% of it); 1 turns the guard off.")] = 0.9
    alarm_min_photos: Annotated[NonNegativeInt, Field(description="Photos a rate must rest on before it can raise an "
                                                                  "alarm (photos read for the reject rate, scored "
                                                                  "for the unknown rate, answered female or male "
                                                                  "for the female share); fewer, and the summary "
                                                                  "says the alarm was withheld.")] = ALARM_MIN_PHOTOS
    lock_lease_seconds: Annotated[float, Field(gt=0, description="How long a dead run's lock on the output outlives "
                                               "it (a live run renews it)."), Flag(name="--lock-lease")] = LEASE_SECONDS
    lock_wait_seconds: Annotated[float, Field(ge=0, description="How long to wait for another run on the same output "
                                              "(0: fail at once)."), Flag(name="--lock-wait")] = 0.0


class Listing(_Group):
    """How the source is listed."""

    method: Annotated[str, AfterValidator(check_listing),
                      Field(description="list (the store itself; on S3, concurrent key ranges), or inventory:URL (an "
                                        "S3 Inventory report's manifest.json or its folder: no LIST calls, up to a "
                                        "day stale)."),
                      Flag(name="--listing", flat="listing", metavar="list|inventory:URL")] = "list"
    fanout: Annotated[PositiveInt | None, Field(description="Concurrent LIST calls on S3 (default 16)."),
                      Flag(name="--listing-fanout", flat="listing_fanout")] = None


class UsersTable(_Group):
    """The users table: how fast it moves to a new model, and whose photos are never read."""

    model_config = ConfigDict(title="Users table")

    refresh_budget: Annotated[NonNegativeInt, Field(description="Photos per run re-scored because their user's answer "
                                                                "comes from another model than this run's (after a "
                                                                "promotion or a rollback), oldest answers first; 0 "
                                                                "turns it off.")] = REFRESH_BUDGET
    exclude_users: Annotated[File | None, Field(description="A text file (path or URL), one user id per line: "
                                                                "those users' photos are never read and they have no "
                                                                "row in the users table (an opt-out list)."),
                             Flag(metavar="URL")] = None


GROUPS: dict[str, type[_Group]] = {"where": Where, "model": ModelChoice, "compute": Compute, "limits": Limits,
                                   "guards": Guards, "listing": Listing, "users": UsersTable}


class NightOptions(BaseModel):
    """Everything a night of nightly-scoring can be told, by group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    where: Where
    model: ModelChoice = ModelChoice()
    compute: Compute = Compute()
    limits: Limits = Limits()
    guards: Guards = Guards()
    listing: Listing = Listing()
    users: UsersTable = UsersTable()
    scoring_date: Annotated[date | None, Field(description="The day the night's rows are filed under "
                                                           "(YYYY-MM-DD); default today in UTC."),
                            Flag(name="--date")] = None

    @model_validator(mode="after")
    def _output_apart_from_source(self) -> "NightOptions":
        source, output = (_normal(self.where.source), _normal(self.where.output))
        if output == source:
            raise ValueError("the output is the source: the tables would be listed as uploads; choose another output")
        if output.startswith(source.rstrip("/") + "/"):
            raise ValueError(f"the output {self.where.output} is inside the source {self.where.source}: its tables "
                             f"would be listed as uploads; choose an output outside the source")
        return self

    # -- what the layers below take --------------------------------------------------------

    def scoring(self, model_device: str) -> ScoringOptions:
        """The scoring engine's options for a model on `model_device`."""
        return ScoringOptions(
            batch_size=self.compute.batch_size, workers=self.compute.workers,
            limits=DecodeLimits(max_bytes=self.limits.max_bytes, max_pixels=self.limits.max_pixels),
            abstain_threshold=self.model.abstain_threshold, front_end=self.compute.front_end,
            jpeg_device="cuda" if self.compute.gpu_decode and model_device.startswith("cuda") else None)

    def listing_spec(self) -> ListingSpec:
        return ListingSpec.parse(self.listing.method, self.listing.fanout)

    # -- the flat parameters of earlier versions ---------------------------------------------

    @classmethod
    def from_flat(cls, parameters: dict[str, Any], base: dict[str, Any] | None = None) -> "NightOptions":
        """The options from the flat parameters earlier versions of the flow took
        (`source`, `output`, `batch_size`, …), over `base` (grouped options, e.g. a
        deployment's) when given; a name no version took is refused."""
        base = base or {}
        grouped: dict[str, dict[str, Any]] = {group: dict(values) for group, values in base.items()
                                              if isinstance(values, dict)}
        top: dict[str, Any] = {name: value for name, value in base.items() if not isinstance(value, dict)}
        places = flat_names()
        for name, value in parameters.items():
            if name not in places:
                raise ValueError(f"{name!r} is not a parameter of nightly-scoring (old or new)")
            group, field = places[name]
            if group is None:
                if value is not None:
                    top[field] = value
            elif value is not None:  # None meant "the default" there
                grouped.setdefault(group, {})[field] = value
        return cls.model_validate({**grouped, **top})


def flag_of(info) -> Flag:
    """A field's Flag (an empty one when it has none)."""
    return next((m for m in info.metadata if isinstance(m, Flag)), Flag())


def fields() -> list[tuple[str | None, str, Any]]:
    """(group or None for a top-level field, field name, pydantic FieldInfo) of every
    option, in the form's order."""
    found = [(group, name, info) for group, model in GROUPS.items() for name, info in model.model_fields.items()]
    found += [(None, name, info) for name, info in NightOptions.model_fields.items() if name not in GROUPS]
    return found


def flat_names() -> dict[str, tuple[str | None, str]]:
    """{the flat parameter's name: (group, field)} for every option."""
    return {flag_of(info).flat or name: (group, name) for group, name, info in fields()}


def _normal(location: str) -> str:
    """A location compared as text: the scheme kept, local paths made absolute."""
    if "://" in location and not location.startswith("file://"):
        return location.rstrip("/")
    path = location.removeprefix("file://")
    return posixpath.normpath(posixpath.abspath(path))
