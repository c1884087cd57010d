import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "1")

import socket  # noqa: E402

import pytest  # noqa: E402

from gender_pipeline import samples  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One real temporary Prefect server for the session's flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def face_files():
    return samples.face_variants()


@pytest.fixture(scope="session")
def broken_files():
    return samples.broken_files()


@pytest.fixture
def uploads(tmp_path, face_files, broken_files):
    """A local uploads tree: a few real faces and one of each broken kind."""
    files = {"ada/baseline.jpg": face_files["baseline.jpg"],
             "bea/photo.heic": face_files["photo.heic"],
             "cy/astronaut.png": face_files.get("astronaut.png", face_files["old.bmp"]),
             "dee/rotated": face_files["rotated-exif6.jpg"]}
    for name, (data, _reason) in broken_files.items():
        files[f"bad-{name.split('.')[0]}/{name}"] = data
    root = tmp_path / "uploads"
    samples.write_tree(str(root), files)
    return root, files


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on loopback."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def retrain_on_generated_faces(root, config, ages: bool = False):
    """`gender-pipeline retrain` with `config` on 40 generated faces under `root` (data/,
    registry/); returns `root`."""
    from gender_pipeline.cli import main

    samples.write_manifest_dataset(str(root / "data"), 40, seed=5, ages=ages)
    status = main(["retrain", "--config", str(config), "--data", str(root / "data"),
                   "--registry", str(root / "registry"), "--device", "cpu"])
    assert status == 0
    return root


def night_options(**flat):
    """A night's options written flat, as the tests name them (source=..., workers=0)."""
    from gender_pipeline.night.options import NightOptions

    return NightOptions.from_flat(flat)
