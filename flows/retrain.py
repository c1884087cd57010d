"""retrain: repeat the study (VGG16, GoogLeNet, ResNet18, tuned ResNet18), train heads on
dlib's face embedding, or fine-tune it for gender and age; select the model that does not
overfit, calibrate it, register it, promote it if it beats production. (Real annotations,
as in flows/scoring.py.)"""

from typing import Literal

from prefect import flow, get_run_logger
from pydantic import NonNegativeInt, PositiveInt

from gender_pipeline.models.experiment import load_experiment, select_winner
from gender_pipeline.models.predictor import resolve_device
from gender_pipeline.tasks.run_control import stoppable_run, stopped
from gender_pipeline.runtime.stopping import StopRequested
from gender_pipeline.models.face_attributes import KIND as ATTRIBUTES_KIND
from gender_pipeline.models.face_embedding import KIND as EMBEDDING_KIND
from gender_pipeline.tasks.training_tasks import (align_faces, cache_attribute_inputs, check_pretrained_weights, embed_faces,
                                  load_labelled_dataset, promotion_gate, publish_results, register_winner,
                                  train_attributes, train_head, train_run)


@flow(name="retrain", description="Repeat the CelebA experiment, register and maybe promote the winner.")
def retrain(config: str, data: str, data_format: Literal["celeba", "manifest"] | None = None,
            registry: str | None = None, device: Literal["auto", "cpu", "cuda"] = "auto",
            endpoint_url: str | None = None, epochs: PositiveInt | None = None,
            image_size: PositiveInt | None = None, archs: list[str] | None = None,
            sample_size: PositiveInt | None = None, batch_size: PositiveInt | None = None,
            pretrained: str | None = None, workers: NonNegativeInt | None = None, promote: bool = True) -> dict:
    """Train the models a config describes on a labelled dataset, register the best one and
    promote it if it beats production on the same test images.

    Args:
        config: The experiment, a YAML file: configs/celeba_experiment.yaml (the study),
            configs/cpu_dev.yaml, configs/face_embedding.yaml (heads on dlib's embedding), or
            configs/face_attributes.yaml / face_attributes_gpu.yaml (gender and age, fine-tuned).
        data: The labelled dataset: a path or fsspec URL.
        data_format: celeba (the official layout) or manifest (labels.csv and images/);
            default the config's.
        registry: The model registry (path or URL); default $GENDER_PIPELINE_REGISTRY or
            ~/.gender-pipeline/registry.
        device: Where training runs: auto (a GPU when there is one), cpu or cuda.
        endpoint_url: An S3-compatible endpoint (MinIO, Ceph); default AWS.
        epochs: Epochs for every run (overrides the config).
        image_size: Chip size in pixels for the study's networks (overrides the config).
        archs: A subset of the study's architectures, e.g. ["resnet18"].
        sample_size: A stratified sample of this many images (overrides the config).
        batch_size: Training batch size (overrides the config).
        pretrained: imagenet, none, or a path/URL of weights (overrides the config).
        workers: DataLoader workers (study) or face alignment processes (face embedding).
        promote: Promote the winner when it beats production (false: register only).
    """
    logger = get_run_logger()
    experiment = load_experiment(config, dict(
        format=data_format, epochs=epochs, image_size=image_size, archs=archs, sample_size=sample_size,
        batch_size=batch_size, pretrained=pretrained, workers=workers))
    device = resolve_device(device)
    with open(config) as handle:
        config_text = handle.read()
    logger.info("experiment %s on %s: runs %s, framing %s", experiment.name, device,
                [r.name for r in experiment.runs], experiment.framing.to_dict())

    with stoppable_run() as stop:
        try:
            with stop.interruptible():
                check_pretrained_weights(experiment)
                dataset = load_labelled_dataset(data, experiment, endpoint_url)
            if experiment.kind == ATTRIBUTES_KIND:  # gender and age, the backbone fine-tuned
                faces = cache_attribute_inputs(dataset, experiment, registry, endpoint_url, device)
                results = [train_attributes(spec, dataset, faces, experiment, device)
                           for spec in experiment.candidates]
                faces_used = faces.faces
            elif experiment.kind == EMBEDDING_KIND:  # heads on dlib's face embedding
                embeddings = embed_faces(dataset, experiment, registry, endpoint_url, device)
                results = [train_head(spec, dataset, embeddings, experiment, device) for spec in experiment.heads]
                faces_used = len(embeddings.index)
            else:  # the study: torchvision networks on aligned chips
                chips = align_faces(dataset, experiment, endpoint_url)
                results, states = [], {}
                for spec in experiment.runs:
                    parent = experiment.init_from.get(spec.name)
                    result = train_run(spec, dataset, chips, experiment, registry, endpoint_url, device,
                                       init_state=states.get(parent))
                    states[spec.name] = result.state_dict
                    results.append(result)
                faces_used = len(chips.kept)
            stop.check()
        except StopRequested:
            return stopped(stop, "every completed epoch is checkpointed in the registry; "
                                 "the same command resumes from there")
        # Registering writes the registry: a stop asked for meanwhile waits until it is done.
        publish_results(results, experiment)
        winner, why = select_winner(results, experiment.max_train_val_gap)
        logger.info(why)
        summary = {"table": [r.row() for r in results], "selection": why, "winner": None, "promotion": None}
        if winner is None:
            logger.warning("nothing registered: %s", why)
            return summary
        version = register_winner(winner, why, results, experiment, dataset, faces_used, registry,
                                  endpoint_url, config_text)
        summary["winner"] = f"{experiment.model_name}@{version}"
        if promote:
            try:
                decision = promotion_gate(experiment, version, dataset, registry, endpoint_url, device)
            except StopRequested:
                return stopped(stop, f"{summary['winner']} is registered but its promotion was not decided; "
                                     f"promote it with `gender-pipeline promote` if it should answer")
            summary["promotion"] = decision["reason"]
    return summary
