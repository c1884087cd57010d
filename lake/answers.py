"""What an answer can say: statuses, genders, age bands, reject reasons, and which model
gave it (NAME@VERSION). One vocabulary for the history, the tables, the data checks and
the reports."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

STATUSES = ("scored", "rejected")
GENDERS = ("male", "female", "unknown")
# Age bands: the first age of each band (the last one open-ended), then their names.
AGE_BAND_STARTS = (0, 18, 25, 35, 45, 55, 65)
AGE_BANDS = ("0-17", "18-24", "25-34", "35-44", "45-54", "55-64", "65+")
UNKNOWN_BAND = "unknown"  # under the model's age abstain threshold
AGE_BAND_VALUES = (*AGE_BANDS, UNKNOWN_BAND)  # every value of the age_band column, in order
# Reasons a photo can be rejected for; `read_error` photos are retried by the next run.
REJECT_REASONS = ("empty", "truncated", "corrupt", "not_an_image", "unsupported_format",
                  "too_small", "too_large", "decompression_bomb", "no_face", "bad_key",
                  "read_error", "decoder_crash")
RETRYABLE_REASONS = ("read_error",)

# The model a run answers with when none is named: the one production points at.
PRODUCTION_MODEL = "production"
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_MODEL_REF = re.compile(rf"({_NAME})(?:@([A-Za-z0-9._-]+))?")


@dataclass(frozen=True)
class ModelRef:
    """A model as people name it: NAME (its production version), NAME@VERSION, or the
    word `production`. The one parser of NAME@VERSION."""

    name: str
    version: str | None = None  # None: the production alias

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        match = _MODEL_REF.fullmatch(text or "")
        if match is None:
            raise ValueError(f"a model is NAME or NAME@VERSION (letters, digits, '.', '_', '-'), got {text!r}")
        return cls(match.group(1), match.group(2))

    @classmethod
    def of(cls, text: str | None) -> "ModelRef | None":
        """A concrete NAME@VERSION, or None for anything else (a name alone, `production`, nothing)."""
        try:
            ref = cls.parse(text or "")
        except ValueError:
            return None
        return ref if ref.version else None

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


def gender_of(p_male: np.ndarray, abstain_threshold: float) -> list[str]:
    """'male' / 'female', or 'unknown' where the confidence is under the threshold."""
    confidence = np.maximum(p_male, 1.0 - p_male)
    return ["unknown" if c < abstain_threshold else ("male" if p >= 0.5 else "female")
            for p, c in zip(p_male, confidence)]


def age_band_index(years) -> np.ndarray:
    """The band of each age in years (an index into AGE_BANDS)."""
    return np.searchsorted(np.asarray(AGE_BAND_STARTS[1:]), np.asarray(years, dtype=np.float64), side="right")


def age_bands_of(years, confidence, abstain_threshold: float) -> list[str]:
    """The band of each age, or `unknown` where the band's probability is under the
    threshold."""
    return [UNKNOWN_BAND if c < abstain_threshold else AGE_BANDS[i]
            for i, c in zip(age_band_index(years), np.asarray(confidence, dtype=np.float64))]


def band_answers(probabilities: np.ndarray, class_ages: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From age distributions: the expected age, its band (an index into AGE_BANDS), and
    the probability mass of that band."""
    years = probabilities @ class_ages
    band = age_band_index(years)
    class_band = age_band_index(class_ages)
    mass = np.zeros((len(probabilities), len(AGE_BAND_STARTS)))
    for index in range(len(AGE_BAND_STARTS)):
        mass[:, index] = probabilities[:, class_band == index].sum(1)
    return years, band, mass[np.arange(len(band)), band]


def in_band_order(counts) -> dict[str, int]:
    """Counts per age band (a mapping, a Counter or a pandas Series) in band order, the
    bands without any left out."""
    return {band: int(counts[band]) for band in AGE_BAND_VALUES if band in counts and counts[band]}
