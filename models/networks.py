"""The torchvision networks the study compared, with a two-class head.

`pretrained` is one of 'imagenet' (torchvision's weights API and its TORCH_HOME cache),
'none' (random init), or a path/URL to a state dict of the ImageNet model.
"""

from __future__ import annotations

import torch
from torch import nn

from gender_pipeline.runtime.errors import UsageFailure

ARCHS = ("vgg16", "googlenet", "resnet18")


class PretrainedWeightsUnavailable(UsageFailure, RuntimeError):
    """ImageNet weights asked for but not on this machine (nothing downloads them at run time)."""


def _imagenet_weights(arch: str):
    from torchvision import models as tvm  # lazy: torchvision's models, a second to import

    return {"vgg16": tvm.VGG16_Weights.IMAGENET1K_V1,
            "googlenet": tvm.GoogLeNet_Weights.IMAGENET1K_V1,
            "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1}[arch]


def build_network(arch: str, num_classes: int = 2, dropout: float = 0.0,
                  freeze: tuple[str, ...] = (), pretrained: str = "none") -> nn.Module:
    """A torchvision `arch` with its classifier replaced by `num_classes` outputs.

    `dropout` > 0 puts a Dropout right before the final linear layer; `freeze` names
    top-level children (e.g. 'layer1', 'layer2') whose parameters stop training.
    """
    from torchvision import models as tvm  # lazy: torchvision's models, a second to import

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    constructor = getattr(tvm, arch)
    kwargs = {"aux_logits": False, "init_weights": True} if arch == "googlenet" else {}
    net = constructor(weights=None, **kwargs)
    if pretrained == "imagenet":
        weights = _imagenet_weights(arch)
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as error:  # no network, no cache
            raise PretrainedWeightsUnavailable(
                f"ImageNet weights for {arch} ({weights.url}) could not be loaded: {error}. "
                f"Put the file in $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch), or pass "
                f"--pretrained PATH to a downloaded copy, or --pretrained none to train from scratch."
            ) from error
        _load_backbone(net, state)
    elif pretrained not in ("none", "", None):
        try:
            if "://" in pretrained:
                state = torch.hub.load_state_dict_from_url(pretrained, progress=False, map_location="cpu")
            else:
                state = torch.load(pretrained, map_location="cpu", weights_only=True)
        except Exception as error:
            raise PretrainedWeightsUnavailable(f"could not load weights from {pretrained}: {error}") from error
        _load_backbone(net, state)

    head_in = _replace_head(net, arch, num_classes, dropout)
    assert head_in > 0
    for name in freeze:
        child = getattr(net, name, None)
        if child is None:
            raise ValueError(f"{arch} has no block named {name!r} to freeze")
        for parameter in child.parameters():
            parameter.requires_grad = False
    return net


def _load_backbone(net: nn.Module, state: dict) -> None:
    # GoogLeNet's aux heads are not built; ignore their keys.
    state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PretrainedWeightsUnavailable(
            f"weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _replace_head(net: nn.Module, arch: str, num_classes: int, dropout: float) -> int:
    def head(in_features: int) -> nn.Module:
        linear = nn.Linear(in_features, num_classes)
        return nn.Sequential(nn.Dropout(dropout), linear) if dropout > 0 else linear

    if arch == "vgg16":
        in_features = net.classifier[-1].in_features
        net.classifier[-1] = head(in_features)
    else:
        in_features = net.fc.in_features
        net.fc = head(in_features)
    return in_features
