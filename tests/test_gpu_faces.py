"""The batched front end (RetinaFace in PyTorch, the warp on the device) gives the chips and
rows of the CPU front end. It runs on the CPU here; tests/test_gpu.py runs it on CUDA."""

from datetime import datetime, timezone

import numpy as np
import pytest

from gender_pipeline import samples
from gender_pipeline.engine.engine import RunStamp, ScoringEngine, ScoringOptions
from gender_pipeline.faces.device import GpuFaceFrontEnd
from gender_pipeline.faces.framing import Framing
from gender_pipeline.faces.front_end import FaceFrontEnd
from gender_pipeline.lake.storage import Store

PHOTOS = [samples.grace_hopper(), samples.astronaut(),
          samples.pasted_into(samples.grace_hopper(), (1600, 1200), (700, 400)), samples.no_face_photo()]


@pytest.mark.parametrize("framing", [Framing(size=150, padding=0.25), Framing(size=32, padding=0.2),
                                     Framing(kind="retinaface_5pt", size=112, padding=0.1)],
                         ids=["dlib-150", "dlib-32", "retinaface_5pt"])
def test_batched_chips_equal_the_cpu_front_end(framing):
    batched = GpuFaceFrontEnd(framing, "cpu").faces(PHOTOS)
    cpu = FaceFrontEnd(first_side=0)  # RetinaFace at 640 px, as the batched front end
    for photo, face in zip(PHOTOS, batched):
        reference = cpu.largest_face(photo, framing)
        if reference is None:
            assert face is None
            continue
        chip = face.chip.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        assert chip.shape == reference.chip.shape and face.count == reference.count
        assert np.abs(chip.astype(int) - reference.chip.astype(int)).mean() < 2.0
        width = reference.box[2] - reference.box[0]
        assert max(abs(a - b) for a, b in zip(face.box, reference.box)) <= 0.02 * width + 2


@pytest.fixture
def scored(uploads, tmp_path):
    from gender_pipeline.models.registry import Registry

    source, files = uploads
    predictor = Registry(str(tmp_path / "registry")).load_predictor("dlib-gender-v1", "cpu")
    store = Store(str(source))

    def run(front_end):
        rows, stats = ScoringEngine(predictor,
                                    ScoringOptions(workers=0, front_end=front_end, gpu_batch=3, detect_first_side=0),
                                    RunStamp("r", datetime.now(timezone.utc))).score(store, store.list_objects(), {})
        return {r.photo_key: r for r in rows}, stats

    return run, files


def test_scoring_through_the_batched_front_end_gives_the_same_rows(scored):
    run, files = scored
    cpu, _ = run("cpu")
    batched, stats = run("gpu")
    assert sorted(batched) == sorted(cpu) == sorted(files)
    for key, row in cpu.items():
        other = batched[key]
        assert (other.status, other.reject_reason, other.face_count) == (row.status, row.reject_reason, row.face_count)
        if row.p_male is not None:
            assert abs(other.p_male - row.p_male) < 0.05, key
    assert stats.stage_seconds["detect"] > 0 and stats.stage_seconds["warp"] > 0


def test_a_batch_that_fails_on_the_device_is_retried_on_the_cpu(scored, monkeypatch):
    run, files = scored
    cpu, _ = run("cpu")

    def broken(self, images, timings=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(GpuFaceFrontEnd, "faces", broken)
    batched, _ = run("gpu")
    assert sorted(batched) == sorted(files)
    assert all(batched[k].status == cpu[k].status and batched[k].reject_reason == cpu[k].reject_reason for k in cpu)
