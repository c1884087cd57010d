"""A retraining run's options, one pydantic model (the retrain flow's one parameter and its
form in the Prefect UI), and the run they open: the experiment the config describes with
the run's overrides, the registry, the storage options and the device, built once and
handed to every step."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveInt

from gender_pipeline.lake.locations import Folder, check_endpoint
from gender_pipeline.lake.storage import Stores
from gender_pipeline.models.experiment import Experiment, load_experiment
from gender_pipeline.models.predictor import resolve_device
from gender_pipeline.models.registry import Registry
from gender_pipeline.runtime.errors import UsageFailure

STUDY_CONFIG = "configs/celeba_experiment.yaml"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Overrides(_Group):
    """Changes to the config's experiment for this run (none: the config as written)."""

    epochs: Annotated[PositiveInt | None, Field(description="Epochs for every run.")] = None
    image_size: Annotated[PositiveInt | None, Field(description="Chip size in pixels for the study's networks.")] = None
    archs: Annotated[list[str] | None, Field(description="A subset of the study's architectures, e.g. "
                                                         "[\"resnet18\"].")] = None
    sample_size: Annotated[PositiveInt | None, Field(description="A stratified sample of this many images.")] = None
    batch_size: Annotated[PositiveInt | None, Field(description="Training batch size.")] = None
    pretrained: Annotated[str | None, Field(description="imagenet, none, or a path/URL of weights.")] = None
    workers: Annotated[int | None, Field(ge=0, description="DataLoader workers (study) or face alignment "
                                                           "processes (face models).")] = None


class RetrainOptions(BaseModel):
    """Everything a retraining run can be told."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Annotated[Folder, Field(description="The labelled dataset: a path or fsspec URL.")]
    config: Annotated[str, Field(description="The experiment, a YAML file: configs/celeba_experiment.yaml (the "
                                             "study), configs/cpu_dev.yaml, configs/face_embedding.yaml (heads on "
                                             "dlib's embedding), or configs/face_attributes.yaml / "
                                             "face_attributes_gpu.yaml (gender and age, fine-tuned).")] = STUDY_CONFIG
    data_format: Annotated[Literal["celeba", "manifest"] | None,
                           Field(description="celeba (the official layout) or manifest (labels.csv and images/); "
                                             "default the config's.")] = None
    registry: Annotated[Folder | None, Field(description="The model registry (path or URL); default "
                                                           "$GENDER_PIPELINE_REGISTRY or "
                                                           "~/.gender-pipeline/registry.")] = None
    endpoint_url: Annotated[str | None, AfterValidator(check_endpoint),
                            Field(description="An S3-compatible endpoint (MinIO, Ceph); default AWS.")] = None
    device: Annotated[Literal["auto", "cpu", "cuda"],
                      Field(description="Where training runs: auto (a GPU when there is one), cpu or cuda.")] = "auto"
    overrides: Annotated[Overrides, Field(description=Overrides.__doc__)] = Overrides()
    promote: Annotated[bool, Field(description="Promote the winner when it beats production (false: register "
                                               "only).")] = True


@dataclass
class TrainingRun:
    """One retraining run's context: the experiment (the config with the run's overrides)
    and its text, the registry, the storage options, the device."""

    experiment: Experiment
    config_text: str
    registry: Registry
    stores: Stores
    device: str
    promote: bool = True

    @classmethod
    def open(cls, options: RetrainOptions) -> "TrainingRun":
        if not os.path.exists(options.config):
            raise UsageFailure(f"config {options.config} not found")
        overrides = options.overrides.model_dump()
        experiment = load_experiment(options.config, {"format": options.data_format, **overrides})
        with open(options.config) as handle:
            text = handle.read()
        stores = Stores(options.endpoint_url)
        return cls(experiment, text, Registry(options.registry, stores.options), stores,
                   resolve_device(options.device), options.promote)
