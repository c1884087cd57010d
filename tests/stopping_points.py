"""Run the CLI with one stage made slow, to signal a real process at a known point.

    python -m tests.stopping_points STAGE [gender-pipeline arguments...]

The stage prints `stage-reached: STAGE` when it is entered and then takes its time:
long (and interruptible) where the main thread only reads, a few seconds where the work
runs in a thread or a worker process, as a slow store, model or disk would."""

import sys
import time


# The real functions, where this process patched them (worker processes may not have).
_REAL: dict = {}


def _reached(stage: str) -> None:
    print(f"stage-reached: {stage}", flush=True)


def _slow(original, stage: str, seconds: float, after: bool = False):
    def slow(*args, **kwargs):
        if after:
            result = original(*args, **kwargs)
        _reached(stage)
        time.sleep(seconds)
        return result if after else original(*args, **kwargs)

    return slow


def slow_prepare(key, data, sha256):
    """A decoder worker job that takes a minute (runs in a spawned worker process)."""
    from gender_pipeline.engine import prepared

    _reached("decoding")
    time.sleep(60)
    return _REAL.get("prepare", prepared.prepare_in_worker)(key, data, sha256)


def slow_chip(data, framing):
    """A training-image alignment job that takes a minute (in a worker process, where
    gender_pipeline.models.chips._chip_job is the real one)."""
    from gender_pipeline.models import chips

    _reached("extraction")
    time.sleep(60)
    return _REAL.get("chip", chips._chip_job)(data, framing)


def _patch(stage: str) -> None:
    import gender_pipeline.engine.prepared as prepared
    import gender_pipeline.lake.output as output
    import gender_pipeline.lake.storage as storage
    import gender_pipeline.models.chips as models_chips
    import gender_pipeline.models.predictor as models_predictor
    import gender_pipeline.models.train as models_train
    import gender_pipeline.tasks.night_tasks as night_tasks
    if stage == "listing":
        import gender_pipeline.lake.listing as listing
        listing.iter_listing = _slow(listing.iter_listing, stage, 60)
    elif stage == "suite":
        night_tasks.check_photo_metadata = _slow(night_tasks.check_photo_metadata, stage, 60)
    elif stage == "reading":
        storage.Store.read_many = _slow(storage.Store.read_many, stage, 2)
    elif stage == "decoding":
        _REAL["prepare"], prepared.prepare_in_worker = prepared.prepare_in_worker, slow_prepare
    elif stage == "model":
        cls = models_predictor.OnnxGenderPredictor
        cls.male_logits = _slow(cls.male_logits, stage, 2)
    elif stage == "publishing":  # a predictions file is written under its temporary name, not moved yet
        original = storage.Store._write_temporary
        slow = _slow(original, stage, 3, after=True)
        storage.Store._write_temporary = (
            lambda self, temp, data: (slow if "/predictions/" in temp else original)(self, temp, data))
    elif stage == "users":  # the photo state is committed; the users table's MERGE is next
        cls = output.OutputState
        cls._merge_users = _slow(cls._merge_users, stage, 60)
    elif stage == "extraction":
        _REAL["chip"], models_chips._chip_job = models_chips._chip_job, slow_chip
    elif stage == "training":  # slow batches; the marker comes once epoch 1 is checkpointed
        original_save, original_item = models_train._save, models_train.ChipDataset.__getitem__

        def save(store, key, state):
            original_save(store, key, state)
            _reached(f"training (checkpoint after epoch {len(state['history'])})")

        def item(self, index):
            time.sleep(0.01)
            return original_item(self, index)

        models_train._save, models_train.ChipDataset.__getitem__ = save, item
    elif stage != "none":
        raise SystemExit(f"unknown stage {stage}")


def patch_from_environment() -> None:
    """For processes started by others (a served deployment's flow runs): a
    sitecustomize.py calls this, and STOP_TEST_STAGE names the stage."""
    import os

    if os.environ.get("STOP_TEST_STAGE"):
        _patch(os.environ["STOP_TEST_STAGE"])


if __name__ == "__main__":
    _patch(sys.argv[1])
    from gender_pipeline.cli import main

    sys.exit(main(sys.argv[2:]))
