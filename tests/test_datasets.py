import numpy as np
import pytest

from gender_pipeline import samples
from gender_pipeline.models.datasets import DatasetError, load_dataset, stratified_sample, stratified_split


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    samples.write_manifest_dataset(str(root), 20)
    return root


def test_manifest_loads_with_groups_and_a_seeded_stratified_split(manifest):
    data = load_dataset(str(manifest), "manifest", seed=3)
    assert len(data.images) == 20 and data.labels.sum() == 10
    assert set(data.split) == {"train", "val", "test"}
    for part in ("train", "val", "test"):  # both classes in every split
        assert set(data.labels[data.split == part]) == {0, 1}
    assert list(data.groups) == ["age_band"]
    again = load_dataset(str(manifest), "manifest", seed=3)
    assert again.fingerprint() == data.fingerprint()
    assert load_dataset(str(manifest), "manifest", seed=4).fingerprint() != data.fingerprint()


def test_celeba_layout_uses_the_male_attribute_and_partition(tmp_path):
    samples.write_celeba_dataset(str(tmp_path), 20)
    data = load_dataset(str(tmp_path), "celeba")
    assert data.image_dir == "img_align_celeba" and data.labels.tolist() == [0, 1] * 10
    assert (data.split == "train").sum() == 12 and (data.split == "test").sum() == 4
    sampled = load_dataset(str(tmp_path), "celeba", sample_size=10, seed=1)
    assert len(sampled.images) == 10 and sampled.labels.sum() == 5


def test_missing_labels_file(tmp_path):
    with pytest.raises(DatasetError, match="labels.csv is missing"):
        load_dataset(str(tmp_path), "manifest")
    with pytest.raises(DatasetError, match="list_attr_celeba.txt is missing"):
        load_dataset(str(tmp_path), "celeba")


def test_listed_image_absent(manifest, tmp_path):
    samples.write_manifest_dataset(str(tmp_path), 6)
    (tmp_path / "images" / "img_0003.jpg").unlink()
    with pytest.raises(DatasetError, match="1 images listed but absent.*img_0003"):
        load_dataset(str(tmp_path), "manifest")


def test_label_outside_male_female(tmp_path):
    samples.write_manifest_dataset(str(tmp_path), 4)
    text = (tmp_path / "labels.csv").read_text().replace("img_0002.jpg,female", "img_0002.jpg,unknown")
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DatasetError, match="line 4: 'unknown'"):
        load_dataset(str(tmp_path), "manifest")


def test_missing_gender_column(tmp_path):
    (tmp_path / "labels.csv").write_text("image,sex\na.jpg,m\n")
    with pytest.raises(DatasetError, match="no 'gender' column"):
        load_dataset(str(tmp_path), "manifest")


def test_unknown_format(manifest):
    with pytest.raises(DatasetError, match="celeba or manifest"):
        load_dataset(str(manifest), "imagenet")


def test_unreadable_images_are_skipped_and_counted_up_to_a_limit(tmp_path):
    from gender_pipeline.models.chips import extract_chips
    from gender_pipeline.faces.framing import Framing

    samples.write_manifest_dataset(str(tmp_path), 10)
    (tmp_path / "images" / "img_0001.jpg").write_bytes(b"garbage")
    data = load_dataset(str(tmp_path), "manifest")
    chips = extract_chips(data, Framing(size=32), workers=0, max_skipped=0.2)
    assert len(chips.kept) == 9 and chips.skipped["not_an_image"] == 1
    with pytest.raises(DatasetError, match="over the limit"):
        extract_chips(data, Framing(size=32), workers=0, max_skipped=0.05)


def test_split_helpers():
    labels = np.array([0] * 30 + [1] * 70)
    split = stratified_split(labels, (0.7, 0.15, 0.15), 0)
    assert (split == "train").sum() == 70 and set(split) == {"train", "val", "test"}
    with pytest.raises(DatasetError):
        stratified_split(labels, (0.5, 0.2, 0.2), 0)
    picked = stratified_sample(labels, 10, 0)
    assert len(picked) == 10 and labels[picked].sum() == 7
