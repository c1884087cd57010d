
import numpy as np
import pytest
import torch

from gender_pipeline import samples
from gender_pipeline.faces.framing import Framing
from gender_pipeline.lake.storage import Store
from gender_pipeline.models.chips import extract_chips
from gender_pipeline.models.datasets import load_dataset
from gender_pipeline.models.experiment import RunResult, load_experiment, select_winner
from gender_pipeline.models.networks import PretrainedWeightsUnavailable, build_network
from gender_pipeline.models.train import Checkpoint, FitOptions, RunSpec, fit


@pytest.fixture(scope="module")
def chips_and_labels(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    samples.write_manifest_dataset(str(root), 24)
    data = load_dataset(str(root), "manifest", seed=0)
    chips = extract_chips(data, Framing(size=32), workers=0)
    labels = data.labels[chips.kept]
    split = data.split[chips.kept]
    return {s: (chips.chips[split == s], labels[split == s]) for s in ("train", "val", "test")}


@pytest.mark.parametrize("arch", ["vgg16", "googlenet", "resnet18"])
def test_one_epoch_of_each_architecture(arch, chips_and_labels, tmp_path):
    spec = RunSpec(name=arch, arch=arch, lr=1e-3, epochs=1, image_size=32, batch_size=8)
    result = fit(spec, chips_and_labels["train"], chips_and_labels["val"], Checkpoint(Store(str(tmp_path)), "ck.pt"))
    assert len(result.history) == 1
    record = result.history[0]
    assert 0 <= record.train_acc <= 1 and 0 <= record.val_acc <= 1 and np.isfinite(record.train_loss)
    assert (tmp_path / "ck.pt").exists()


def test_tuned_resnet_freezes_layer1_layer2_and_has_dropout():
    net = build_network("resnet18", dropout=0.5, freeze=("layer1", "layer2"))
    assert all(not p.requires_grad for p in net.layer1.parameters())
    assert all(not p.requires_grad for p in net.layer2.parameters())
    assert all(p.requires_grad for p in net.layer3.parameters())
    assert isinstance(net.fc, torch.nn.Sequential) and isinstance(net.fc[0], torch.nn.Dropout)
    assert net.fc[0].p == 0.5 and net.fc[1].out_features == 2


def test_frozen_layers_do_not_move_during_training(chips_and_labels, tmp_path):
    spec = RunSpec(name="tuned", arch="resnet18", lr=1e-2, epochs=1, image_size=32, batch_size=8,
                   freeze=("layer1", "layer2"), dropout=0.5)
    torch.manual_seed(spec.seed)
    before = build_network("resnet18", dropout=0.5, freeze=spec.freeze).state_dict()
    result = fit(spec, chips_and_labels["train"], chips_and_labels["val"], Checkpoint(Store(str(tmp_path)), "ck.pt"))
    after = result.model.state_dict()
    assert torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    assert torch.equal(before["layer2.0.conv1.weight"], after["layer2.0.conv1.weight"])
    assert not torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])


def test_resume_after_interruption_equals_uninterrupted(chips_and_labels, tmp_path):
    spec = RunSpec(name="r", arch="resnet18", lr=1e-3, epochs=3, image_size=32, batch_size=8, dropout=0.2)
    whole = fit(spec, chips_and_labels["train"], chips_and_labels["val"], Checkpoint(Store(str(tmp_path / "a")), "ck.pt"))
    store = Store(str(tmp_path / "b"))
    first = fit(spec, chips_and_labels["train"], chips_and_labels["val"], Checkpoint(store, "ck.pt"),
                FitOptions(stop_after=1))
    assert len(first.history) == 1
    resumed = fit(spec, chips_and_labels["train"], chips_and_labels["val"], Checkpoint(store, "ck.pt"))
    assert resumed.resumed_from == 1 and len(resumed.history) == 3
    for name, tensor in whole.model.state_dict().items():
        assert torch.allclose(tensor.float(), resumed.model.state_dict()[name].float(), atol=1e-6), name
    assert [h.val_acc for h in whole.history] == [h.val_acc for h in resumed.history]


def test_missing_imagenet_weights_fail_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsUnavailable, match="TORCH_HOME"):
        build_network("resnet18", pretrained="imagenet")
    with pytest.raises(PretrainedWeightsUnavailable, match="could not load"):
        build_network("resnet18", pretrained=str(tmp_path / "missing.pth"))


def test_weights_from_a_path_are_loaded(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(5)
    reference = resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    net = build_network("resnet18", pretrained=str(tmp_path / "resnet18.pth"))
    assert torch.equal(net.conv1.weight, reference.conv1.weight)


def _result(name, train, val):
    empty = np.zeros(0)
    return RunResult(name, "resnet18", train, val, val, train - val, {}, empty, empty, empty, empty, [], 1, 1)


def test_selection_prefers_best_val_among_non_overfitting():
    runs = [_result("vgg16", 0.865, 0.874), _result("resnet18", 0.99, 0.95), _result("tuned", 0.9639, 0.9629)]
    winner, why = select_winner(runs, 0.03)
    assert winner.name == "tuned" and "resnet18" in why
    none, why = select_winner([_result("a", 0.99, 0.8)], 0.03)
    assert none is None and "gap" in why


def test_configs_match_the_study():
    study = load_experiment("configs/celeba_experiment.yaml")
    assert [r.name for r in study.runs] == ["vgg16", "googlenet", "resnet18", "resnet18-tuned"]
    base = {r.name: r for r in study.runs}
    assert all(base[n].lr == 1e-4 and base[n].epochs == 100 and base[n].pretrained == "imagenet"
               for n in ("vgg16", "googlenet", "resnet18"))
    tuned = base["resnet18-tuned"]
    assert tuned.lr == 1e-6 and tuned.freeze == ("layer1", "layer2") and tuned.dropout == 0.5
    assert study.sample_size == 5006 and study.data_format == "celeba" and study.framing.size == 224
    dev = load_experiment("configs/cpu_dev.yaml", {"epochs": 1, "archs": ["resnet18"], "image_size": 48})
    assert all(r.pretrained == "none" and r.epochs == 1 and r.image_size == 48 for r in dev.runs)
    assert dev.framing.size == 48
    with pytest.raises(ValueError, match="--archs"):
        load_experiment("configs/cpu_dev.yaml", {"archs": ["alexnet"]})
