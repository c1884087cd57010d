#!/usr/bin/env bash
# One short GPU check: the device JPEG decoder against the CPU's (benchmarks/decode_check.py),
# the CUDA tests, then ResNet18 at 224 px and the face-embedding model
# (dlib's face ResNet + head) at 150 px with bf16 autocast, model-only and end to end, with GPU
# memory; last, the GPU path fed from the bytes (JPEGs decoded on the device): 10,000
# phone-sized JPEG uploads and the mixed uploads, photos/s, GPU utilisation, seconds per
# stage and the limiting stage. Usage: bash benchmarks/gpu_check.sh [UPLOADS_FOLDER]
# UPLOADS_FOLDER is a folder made by benchmarks/make_uploads.py (end-to-end part skipped without it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PREFECT_SERVER_ANALYTICS_ENABLED=false GX_ANALYTICS_ENABLED=False
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# First: the device JPEG decoder gives the CPU's pixels while other work is queued (fails the check if not).
$PY benchmarks/decode_check.py --device cuda --rounds 50 ${1:+--uploads "$1/uploads"}
$PY -m pytest -q -m gpu tests/test_gpu.py tests/test_dlib_resnet.py
$PY - "${1:-}" <<'PYEOF'
import io, json, os, sys, tempfile, time
import numpy as np, torch
from gender_pipeline.models.networks import build_network
from gender_pipeline.models.registry import Registry
from gender_pipeline.faces.framing import Framing

registry = Registry(tempfile.mkdtemp())
net = build_network("resnet18", pretrained="none")
buffer = io.BytesIO(); torch.save(net.state_dict(), buffer)
registry.register("gpu-check", "1", {"arch": "resnet18", "format": "torch", "weights": "model.pt",
    "framing": Framing(size=224, padding=0.25).to_dict(), "class_order": ["female", "male"]},
    {"model.pt": buffer.getvalue()})
def throughput(predictor, size: int, seconds: float = 10.0) -> tuple[float, int]:
    """Chips per second of `predictor` on random chips, at its own batch size, after warm-up."""
    batch = predictor.auto_batch_size()
    chips = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(3):
        predictor.predict(chips)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        predictor.predict(chips); done += batch
    torch.cuda.synchronize()
    return done / (time.perf_counter() - start), batch

predictor = registry.load_predictor("gpu-check@1", "cuda")
rate, batch = throughput(predictor, 224)
print(json.dumps({"model_only_images_per_s": round(rate, 1), "batch_size": batch,
                  "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20),
                  "gpu": torch.cuda.get_device_name()}))
from gender_pipeline.models.dlib_resnet import load_dlib_face_resnet
from gender_pipeline.models.face_embedding import Embedder, EmbeddingPredictor, EmbeddingSettings, GenderHead, HeadSpec
framing = Framing(size=150, padding=0.25)
embedding = EmbeddingPredictor(Embedder(load_dlib_face_resnet(), EmbeddingSettings(), framing, "cuda"),
                               GenderHead(HeadSpec(name="h"), EmbeddingSettings()), name="e", version="1",
                               framing=framing, device="cuda")
faces_per_s, faces_batch = throughput(embedding, 150)
print(json.dumps({"face_embedding_faces_per_s": round(faces_per_s, 1), "flip_average": True, "batch_size": faces_batch,
                  "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20)}))
uploads = sys.argv[1]
if uploads:
    from datetime import datetime, timezone
    from gender_pipeline.engine.engine import RunStamp, ScoringEngine, ScoringOptions
    from gender_pipeline.lake.storage import Store
    store = Store(os.path.join(uploads, "uploads"))
    objects = store.list_objects()
    start = time.perf_counter()
    rows, stats = ScoringEngine(predictor, ScoringOptions(batch_size=batch), RunStamp("gpu", datetime.now(timezone.utc))).score(
        store, objects, {})
    seconds = time.perf_counter() - start
    print(json.dumps({"end_to_end_photos_per_s": round(len(rows) / seconds, 1), "photos": len(rows),
                      "fraction_of_model_only": round(len(rows) / seconds / rate, 4),
                      "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20)}))
    # The shipped model through the GPU front end (RetinaFace batched on the GPU, dlib's
    # landmarks on the CPU) and the CPU front end, with GPU utilisation sampled meanwhile.
    import subprocess, threading
    shipped = registry.load_predictor("dlib-gender-v1", "cuda")
    for front_end in ("gpu", "cpu"):
        busy, done = [], threading.Event()
        def sample():
            while not done.wait(0.5):
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True).stdout.strip()
                busy.append(float(out.splitlines()[0]) if out else 0.0)
        watcher = threading.Thread(target=sample, daemon=True); watcher.start()
        start = time.perf_counter()
        rows, stats = ScoringEngine(shipped, ScoringOptions(front_end=front_end, gpu_batch=64),
                                    RunStamp("gpu", datetime.now(timezone.utc))).score(store, objects, {})
        seconds = time.perf_counter() - start
        done.set(); watcher.join()
        print(json.dumps({"front_end": front_end, "photos_per_s": round(len(rows) / seconds, 1),
                          "scored": stats.scored, "rejected": stats.rejected,
                          "gpu_utilisation_mean_pct": round(sum(busy) / max(len(busy), 1), 1),
                          "stage_seconds": {k: round(v, 1) for k, v in stats.stage_seconds.items()}}))
PYEOF
# The GPU path fed from the bytes: 10,000 phone-sized JPEGs, then the mixed uploads when given.
$PY benchmarks/gpu_feed_check.py --count "${GPU_FEED_COUNT:-10000}" ${1:+--mixed "$1/uploads"}
