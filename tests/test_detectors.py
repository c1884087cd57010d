"""Both face detectors on generated photos (the demo's two real portraits, pasted, rotated,
cropped, and photos without a face): recall, false positives, and how level the eyes are
after alignment. RetinaFace is the default; HOG is what it replaced."""

import numpy as np
import pytest
from PIL import Image

from gender_pipeline import samples
from gender_pipeline.faces.framing import Framing
from gender_pipeline.faces.front_end import FaceFrontEnd

PORTRAITS = {"grace": samples.grace_hopper(), "astronaut": samples.astronaut()}
SIZES = [(640, 480), (1280, 960), (2048, 1536), (4032, 3024)]


def _pasted():
    photos = []
    for seed, (name, face) in enumerate(PORTRAITS.items()):
        for size in SIZES:
            scale = size[0] / 2600  # the face takes a realistic share of the photo
            small = np.asarray(Image.fromarray(face).resize((max(64, int(face.shape[1] * scale * 2)),
                                                             max(64, int(face.shape[0] * scale * 2)))))
            at = (size[0] // 3, size[1] // 4)
            photos.append((f"{name}-{size[0]}", samples.pasted_into(small, size, at, seed=seed)))
    return photos


def _rotated():
    photos = []
    for name, face in PORTRAITS.items():
        for angle in (-25, -15, 15, 25):
            turned = np.asarray(Image.fromarray(face).rotate(angle, resample=Image.Resampling.BILINEAR,
                                                             expand=True, fillcolor=(120, 120, 120)))
            photos.append((f"{name}-{angle}deg", samples.pasted_into(turned, (1280, 960), (300, 150))))
    return photos


def _crops():
    front = FaceFrontEnd(detector="hog")
    photos = []
    for name, face in PORTRAITS.items():
        left, top, right, bottom = front.detect(face)[0].box
        for margin in (0.2, 0.5):
            pad = int(margin * (right - left))
            crop = face[max(0, top - pad):bottom + pad, max(0, left - pad):right + pad]
            photos.append((f"{name}-crop{margin}", np.ascontiguousarray(crop)))
    return photos


def _face_free():
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    y, x = np.mgrid[0:600, 0:800]
    stripes = np.stack([(x // 40 % 2) * 200, (y // 40 % 2) * 200, ((x + y) // 60 % 2) * 150], axis=2).astype(np.uint8)
    blurred = np.asarray(Image.fromarray(noise).resize((40, 30)).resize((1280, 960)))
    return [("coffee", samples.no_face_photo()), ("noise", noise), ("stripes", stripes), ("blur", blurred)]


SETS = {"pasted": _pasted(), "rotated": _rotated(), "crops": _crops()}


@pytest.fixture(scope="module", params=["retinaface", "hog"])
def front(request):
    return FaceFrontEnd(detector=request.param)


def _eye_angle(chip: np.ndarray, reader: FaceFrontEnd) -> float | None:
    """Degrees the eye line of an aligned chip is off level, read by RetinaFace's own points."""
    big = np.asarray(Image.fromarray(chip).resize((300, 300), Image.Resampling.BICUBIC))
    found = reader.detect(big)
    if not found:
        return None
    (lx, ly), (rx, ry) = found[0].points[0], found[0].points[1]
    return abs(np.degrees(np.arctan2(ry - ly, rx - lx)))


def test_recall_false_positives_and_eye_level(front):
    reader = front if front.detector == "retinaface" else FaceFrontEnd(detector="retinaface")
    framing = Framing(size=150, padding=0.25, detector=front.detector)
    recall, angles = {}, []
    for name, photos in SETS.items():
        found = 0
        for _, photo in photos:
            face = front.largest_face(photo, framing)
            if face is not None:
                found += 1
                angle = _eye_angle(face.chip, reader)
                if angle is not None:
                    angles.append(angle)
        recall[name] = found / len(photos)
    false = sum(bool(front.detect(photo)) for _, photo in _face_free())
    print(f"\n{front.detector}: recall {recall}, faces found on {false} of 4 face-free photos, eye level "
          f"median {np.median(angles):.2f} deg, max {np.max(angles):.2f} deg over {len(angles)} chips")
    assert false == 0
    assert np.median(angles) < 3
    if front.detector == "retinaface":
        assert recall == {"pasted": 1.0, "rotated": 1.0, "crops": 1.0}
    else:
        assert recall["pasted"] >= 0.75 and recall["crops"] == 1.0


def test_retinaface_boxes_give_hog_landmarks():
    """Mapped to HOG's convention, RetinaFace's box gives the landmarks (so the chip) that
    HOG's box gives: within 1% of the face's width."""
    hog, retina = FaceFrontEnd(detector="hog"), FaceFrontEnd(detector="retinaface")
    for name, face in PORTRAITS.items():
        a, b = hog.detect(face)[0], retina.detect(face)[0]
        width = a.box[2] - a.box[0]
        assert max(abs(x - y) for x, y in zip(a.box, b.box)) < 0.25 * width, (name, a.box, b.box)
        marks = [np.array([(p.x, p.y) for p in hog._landmarks(face, hog._dlib.rectangle(*d.box)).parts()])
                 for d in (a, b)]
        assert np.abs(marks[0] - marks[1]).mean() < 0.01 * width, (name, marks)


def test_retinaface_own_points_framing():
    retina = FaceFrontEnd(detector="retinaface")
    framing = Framing(kind="retinaface_5pt", size=112, padding=0.0)
    for name, face in PORTRAITS.items():
        found = retina.largest_face(face, framing)
        assert found.chip.shape == (112, 112, 3) and found.chip.dtype == np.uint8
        assert _eye_angle(found.chip, retina) < 5, name  # all five points are fitted, not only the eyes
    with pytest.raises(ValueError, match="retinaface detector"):
        Framing(kind="retinaface_5pt", detector="hog")


def test_training_chips_with_retinaface_points(tmp_path):
    """The retrain flow can train on RetinaFace's own alignment: its chips come out of the
    same front end as scoring's."""
    from gender_pipeline.models.chips import extract_chips
    from gender_pipeline.models.datasets import load_manifest

    samples.write_manifest_dataset(str(tmp_path / "data"), 6, seed=3)
    framing = Framing(kind="retinaface_5pt", size=64, padding=0.2)
    chips = extract_chips(load_manifest(str(tmp_path / "data")), framing, workers=0)
    assert chips.chips.shape[1:] == (64, 64, 3) and len(chips.kept) == 6
