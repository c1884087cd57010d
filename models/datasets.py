"""Labelled face datasets: the official CelebA layout and the `manifest` format.

Both become a `LabelledSet`: image keys, labels (1 = male), extra group columns, and a
split of each image into train/val/test. Any fsspec URL works for the root.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from dataclasses import dataclass, field

import numpy as np

from gender_pipeline.lake.storage import Store
from gender_pipeline.runtime.errors import UsageFailure

log = logging.getLogger(__name__)

LABELS = {"female": 0, "male": 1}
SPLITS = ("train", "val", "test")


class DatasetError(UsageFailure, ValueError):
    prefix = "dataset problem: "


@dataclass
class LabelledSet:
    root: str
    image_dir: str
    images: list[str]
    labels: np.ndarray  # int64, 1 = male
    split: np.ndarray  # str: train / val / test
    groups: dict[str, list] = field(default_factory=dict)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name, label, part in zip(self.images, self.labels, self.split):
            digest.update(f"{name}\t{label}\t{part}\n".encode())
        return digest.hexdigest()

    def subset(self, keep: np.ndarray) -> "LabelledSet":
        keep = np.asarray(keep)
        return LabelledSet(self.root, self.image_dir, [self.images[i] for i in keep], self.labels[keep],
                           self.split[keep], {k: [v[i] for i in keep] for k, v in self.groups.items()})


def dataset_ages(data: LabelledSet) -> np.ndarray | None:
    """Ages in years from the `age` column (-1 where a row leaves it empty), or None when
    the dataset has no such column. A value that is not an age is an error naming it."""
    values = data.groups.get("age")
    if values is None:
        return None
    ages = np.full(len(values), -1.0)
    for row, value in enumerate(values):
        text = str(value or "").strip()
        if not text:
            continue
        try:
            age = float(text)
        except ValueError:
            raise DatasetError(f"{data.root}: age must be a number of years, got {text!r} for "
                               f"{data.images[row]}") from None
        if not 0 <= age <= 120 or age != age:
            raise DatasetError(f"{data.root}: age must be between 0 and 120 years, got {text!r} for "
                               f"{data.images[row]}")
        ages[row] = age
    return ages


def stratified_split(labels: np.ndarray, ratios: tuple[float, float, float], seed: int) -> np.ndarray:
    """Assign train/val/test per class with a fixed seed, keeping class balance."""
    if abs(sum(ratios) - 1) > 1e-6 or min(ratios) < 0:
        raise DatasetError(f"split ratios must be non-negative and sum to 1, got {ratios}")
    rng = np.random.default_rng(seed)
    split = np.empty(len(labels), dtype=object)
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        n_train = int(round(ratios[0] * len(members)))
        n_val = int(round(ratios[1] * len(members)))
        split[members[:n_train]] = "train"
        split[members[n_train:n_train + n_val]] = "val"
        split[members[n_train + n_val:]] = "test"
    return split.astype(str)


def stratified_sample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` indices drawn per class in proportion, sorted, with a fixed seed."""
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        take = int(round(size * len(members) / len(labels)))
        chosen.append(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))[:size]


def _read_text(store: Store, key: str) -> str:
    try:
        return store.read(key).decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{store.url}/{key} is missing") from None


def _check_images_exist(store: Store, image_dir: str, names: list[str]) -> None:
    try:
        present = {o.key[len(image_dir) + 1:] for o in store.list_objects(image_dir)}
    except FileNotFoundError:
        present = set()
    missing = [n for n in names if n not in present]
    if missing:
        raise DatasetError(f"{len(missing)} images listed but absent under {store.url}/{image_dir}, "
                           f"e.g. {missing[:5]}")


def load_manifest(url: str, options: dict | None = None, ratios=(0.7, 0.15, 0.15), seed: int = 0,
                  sample_size: int | None = None) -> LabelledSet:
    """`labels.csv` (image, gender[, …]) with the images under `images/`. A `split`
    column, when present, is used as is; other extra columns become groups."""
    store = Store(url, options)
    rows = list(csv.DictReader(io.StringIO(_read_text(store, "labels.csv"))))
    if not rows:
        raise DatasetError(f"{url}/labels.csv has no rows")
    for column in ("image", "gender"):
        if column not in rows[0]:
            raise DatasetError(f"{url}/labels.csv has no '{column}' column (columns: {list(rows[0])})")
    bad = [(i + 2, r["gender"]) for i, r in enumerate(rows) if (r["gender"] or "").strip().lower() not in LABELS]
    if bad:
        raise DatasetError(f"{url}/labels.csv: gender must be male or female; {len(bad)} rows are not, "
                           f"e.g. line {bad[0][0]}: {bad[0][1]!r}")
    labels = np.array([LABELS[r["gender"].strip().lower()] for r in rows], dtype=np.int64)
    keep = stratified_sample(labels, sample_size, seed) if sample_size else np.arange(len(rows))
    rows = [rows[i] for i in keep]
    labels = labels[keep]
    names = [r["image"] for r in rows]
    _check_images_exist(store, "images", names)
    if "split" in rows[0]:
        split = np.array([r["split"] for r in rows], dtype=str)
        unknown = sorted(set(split) - set(SPLITS))
        if unknown:
            raise DatasetError(f"{url}/labels.csv: split must be train, val or test, found {unknown}")
    else:
        split = stratified_split(labels, ratios, seed)
    extra = [c for c in rows[0] if c not in ("image", "gender", "split")]
    groups = {c: [r[c] for r in rows] for c in extra}
    return LabelledSet(store.url, "images", names, labels, split, groups)


def load_celeba(url: str, options: dict | None = None, ratios=(0.7, 0.15, 0.15), seed: int = 0,
                sample_size: int | None = None) -> LabelledSet:
    """Official layout: label = the `Male` attribute. With `sample_size`, a stratified
    sample split by `ratios` (as the study's 5,006 images); else the official partition."""
    store = Store(url, options)
    lines = _read_text(store, "list_attr_celeba.txt").splitlines()
    if len(lines) < 3:
        raise DatasetError(f"{url}/list_attr_celeba.txt is too short")
    attributes = lines[1].split()
    if "Male" not in attributes:
        raise DatasetError(f"{url}/list_attr_celeba.txt has no Male attribute")
    column = attributes.index("Male") + 1
    names, labels = [], []
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(attributes) + 1 or parts[column] not in ("1", "-1"):
            raise DatasetError(f"{url}/list_attr_celeba.txt line {number}: Male must be 1 or -1")
        names.append(parts[0])
        labels.append(1 if parts[column] == "1" else 0)
    labels = np.array(labels, dtype=np.int64)
    if sample_size:
        keep = stratified_sample(labels, sample_size, seed)
        names, labels = [names[i] for i in keep], labels[keep]
        split = stratified_split(labels, ratios, seed)
    else:
        partition = {}
        for line in _read_text(store, "list_eval_partition.txt").splitlines():
            parts = line.split()
            if len(parts) == 2:
                partition[parts[0]] = SPLITS[int(parts[1])]
        missing = [n for n in names if n not in partition]
        if missing:
            raise DatasetError(f"{len(missing)} images have no partition, e.g. {missing[:3]}")
        split = np.array([partition[n] for n in names], dtype=str)
    _check_images_exist(store, "img_align_celeba", names)
    return LabelledSet(store.url, "img_align_celeba", names, labels, split, {})


def load_dataset(url: str, fmt: str, options: dict | None = None, **kwargs) -> LabelledSet:
    loaders = {"manifest": load_manifest, "celeba": load_celeba}
    if fmt not in loaders:
        raise DatasetError(f"dataset format must be celeba or manifest, got {fmt!r}")
    return loaders[fmt](url, options, **kwargs)
