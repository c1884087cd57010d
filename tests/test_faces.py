import numpy as np
import pytest
from PIL import Image

from gender_pipeline import samples
from gender_pipeline.engine.prepared import prepare_photo
from gender_pipeline.faces.chip import ChipRecipe
from gender_pipeline.faces.decoding import DecodeLimits
from gender_pipeline.faces.framing import Framing
from gender_pipeline.faces.front_end import FaceFrontEnd


@pytest.fixture(scope="module", params=["retinaface", "hog"])
def frontend(request):
    return FaceFrontEnd(detector=request.param)


def test_finds_the_face_in_a_portrait(frontend):
    portrait = samples.grace_hopper()
    face = frontend.largest_face(portrait, Framing(size=48, padding=0.25))
    assert face is not None and face.count == 1
    left, top, right, bottom = face.box
    # The face sits in the upper middle of this portrait.
    assert 100 < left < right < 420 and 80 < top < bottom < 420
    assert face.chip.shape == (48, 48, 3) and face.chip.dtype == np.uint8


def test_no_face_in_a_photo_of_coffee(frontend):
    assert frontend.largest_face(samples.no_face_photo(), Framing()) is None


def test_detection_on_a_downscaled_copy_maps_back(frontend):
    portrait = samples.grace_hopper()
    big = samples.pasted_into(portrait, (1800, 1400), (900, 600))
    box_small = frontend.detect(big)[0].box
    reference = FaceFrontEnd(detector=frontend.detector, detect_side=4000).detect(big)[0].box
    assert iou(box_small, reference) > 0.6, (box_small, reference)
    assert box_small[0] > 900 and box_small[1] > 600


def iou(a, b):
    left, top = max(a[0], b[0]), max(a[1], b[1])
    right, bottom = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, right - left) * max(0, bottom - top)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_largest_of_several_faces_is_used(frontend):
    portrait = samples.grace_hopper()
    small = np.asarray(Image.fromarray(portrait).resize((256, 300)))
    canvas = samples.pasted_into(portrait, (1000, 700), (0, 0))
    canvas[350:650, 700:956] = small
    faces = [f.box for f in frontend.detect(canvas)]
    assert len(faces) == 2
    area = [(b[2] - b[0]) * (b[3] - b[1]) for b in faces]
    assert area[0] > area[1] and faces[0][0] < 512


def test_face_box_is_reported_in_original_pixels():
    big = samples.pasted_into(samples.grace_hopper(), (4000, 3000), (2000, 1500))
    data = samples.encode(big, "JPEG", quality=90)
    prepared = prepare_photo("u/big.jpg", data, "sha", ChipRecipe(Framing(), DecodeLimits(working_side=1000)))
    assert prepared.reject_reason is None
    left, top, right, bottom = prepared.box
    assert 2000 + 100 < left < right < 2000 + 420 and 1500 + 80 < top < bottom < 1500 + 420


@pytest.mark.parametrize("bad", [dict(kind="square"), dict(size=4), dict(padding=-1), dict(detector="mmod")])
def test_framing_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        Framing(**bad)


def test_framing_round_trips_through_a_card():
    framing = Framing(size=224, padding=0.3)
    assert Framing.from_dict(framing.to_dict()) == framing


def test_edge_fill_repeats_the_border_where_the_chip_leaves_the_photo():
    import numpy as np
    import pytest

    from gender_pipeline import samples
    from gender_pipeline.faces.framing import Framing
    from gender_pipeline.faces.front_end import FaceFrontEnd

    front = FaceFrontEnd()
    photo = samples.grace_hopper()
    left, top, right, bottom = front.detect(photo)[0].box
    tight = np.ascontiguousarray(photo[top:bottom, left:right])  # the chip reaches past every side
    box = front.detect(tight)[0]
    black = front.align(tight, box, Framing(size=150, padding=0.25))
    edge = front.align(tight, box, Framing(size=150, padding=0.25, fill="edge"))
    inside = front.align(photo, front.detect(photo)[0], Framing(size=150, padding=0.25, fill="edge"))
    assert (black.reshape(-1, 3).sum(1) == 0).mean() > 0.05
    assert (edge.reshape(-1, 3).sum(1) == 0).mean() == 0
    assert np.array_equal(black[60:90, 60:90], edge[60:90, 60:90])  # the face itself is the same
    assert np.array_equal(inside, front.align(photo, front.detect(photo)[0], Framing(size=150, padding=0.25)))
    with pytest.raises(ValueError, match="fill"):
        Framing(size=150, fill="mirror")


# ------------------------------------------------------------ RetinaFace's first look

class _Counting:
    """Wraps a RetinaFace session and records the input sizes it is run on."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    def detect(self, rgb, **options):
        self.sizes.append(max(rgb.shape[:2]))
        return self.inner.detect(rgb, **options)


def _counted(first_side):
    front = FaceFrontEnd(first_side=first_side)
    front._retinaface = _Counting(front._retinaface)
    return front


def test_a_large_face_is_found_by_the_first_look_alone():
    face = np.asarray(Image.fromarray(samples.grace_hopper()).resize((1024, 1200)))
    photo = samples.pasted_into(face, (1600, 1300), (300, 50))
    cascade, single = _counted(256), _counted(0)
    found, reference = cascade.detect(photo), single.detect(photo)
    assert cascade._retinaface.sizes == [229] and single._retinaface.sizes == [640]  # 1600 / 7
    assert len(found) == len(reference) == 1
    assert iou(found[0].box, reference[0].box) > 0.8


def test_a_small_face_is_boxed_again_at_the_full_scale_on_a_crop():
    """Grace Hopper at 700 pixels wide in a 1600 px photo (her face about 36 px in the first look): under SMALL_FACE in the
    first look's copy, so RetinaFace looks again, at the 640 px look's scale, on a crop
    around the face only, and boxes it as the whole 640 px look does."""
    face = np.asarray(Image.fromarray(samples.grace_hopper()).resize((700, 820)))
    photo = samples.pasted_into(face, (1600, 1200), (700, 300))
    cascade, single = _counted(256), _counted(0)
    found, reference = cascade.detect(photo), single.detect(photo)
    first, second = cascade._retinaface.sizes
    assert first == 229 and second < 400  # 1600 / 7, then a crop of about twice the face at 0.4
    assert found and reference and len(found) == len(reference)
    assert max(abs(a - b) for a, b in zip(found[0].box, reference[0].box)) <= 3
    assert np.abs(found[0].points - reference[0].points).max() <= 3


def test_nothing_found_at_first_means_a_second_look():
    cascade = _counted(256)
    big = np.asarray(Image.fromarray(samples.no_face_photo()).resize((1600, 1067)))
    assert cascade.detect(np.ascontiguousarray(big)) == []
    assert cascade._retinaface.sizes == [229, 640]


def test_small_photos_and_hog_skip_the_first_look():
    assert _counted(256).first_side == 256 and FaceFrontEnd(detector="hog").first_side == 0
    assert FaceFrontEnd(first_side=640).first_side == 0  # not below the detect side: off
    cascade = _counted(256)
    small = np.asarray(Image.fromarray(samples.grace_hopper()).resize((400, 469)))  # under twice 256
    assert cascade.detect(small) and cascade._retinaface.sizes == [469]
    with pytest.raises(ValueError, match="detection sides"):
        FaceFrontEnd(first_side=-1)
