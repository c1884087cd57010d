"""retrain: repeat the study (VGG16, GoogLeNet, ResNet18, tuned ResNet18), train heads on
dlib's face embedding, or fine-tune it for gender and age; select the model that does not
overfit, calibrate it, register it, promote it if it beats production. (Real annotations,
as in flows/scoring.py.)"""

from prefect import flow, get_run_logger

from gender_pipeline.models.experiment import select_winner
from gender_pipeline.models.retrain_options import RetrainOptions, TrainingRun
from gender_pipeline.runtime.stopping import StopRequested
from gender_pipeline.tasks.run_control import stoppable_run, stopped
from gender_pipeline.tasks.training_tasks import (check_pretrained_weights, load_labelled_dataset, promotion_gate,
                                                  publish_results, register_winner, train_candidates)


@flow(name="retrain", description="Repeat the CelebA experiment, register and maybe promote the winner.")
def retrain(options: RetrainOptions) -> dict:
    """Train the models a config describes on a labelled dataset, register the best one and
    promote it if it beats production on the same test images.

    Args:
        options: The dataset, the experiment (a config and this run's overrides), the
            registry, the device, and whether to promote
            (gender_pipeline.models.retrain_options.RetrainOptions).
    """
    logger = get_run_logger()
    run = TrainingRun.open(options)
    experiment = run.experiment
    logger.info("experiment %s on %s: runs %s, framing %s", experiment.name, run.device,
                [r.name for r in experiment.runs], experiment.framing.to_dict())
    with stoppable_run() as stop:
        try:
            with stop.interruptible():
                check_pretrained_weights(experiment)
                dataset = load_labelled_dataset(run, options.data)
            results, faces_used = train_candidates(run, dataset)
            stop.check()
        except StopRequested:
            return stopped(stop, "every completed epoch is checkpointed in the registry; "
                                 "the same command resumes from there")
        # Registering writes the registry: a stop asked for meanwhile waits until it is done.
        publish_results(run, results)
        winner, why = select_winner(results, experiment.max_train_val_gap)
        logger.info(why)
        summary = {"table": [r.row() for r in results], "selection": why, "winner": None, "promotion": None}
        if winner is None:
            logger.warning("nothing registered: %s", why)
            return summary
        version = register_winner(run, winner, why, results, dataset, faces_used)
        summary["winner"] = f"{experiment.model_name}@{version}"
        if run.promote:
            try:
                summary["promotion"] = promotion_gate(run, version, dataset)["reason"]
            except StopRequested:
                return stopped(stop, f"{summary['winner']} is registered but its promotion was not decided; "
                                     f"promote it with `gender-pipeline promote` if it should answer")
    return summary
