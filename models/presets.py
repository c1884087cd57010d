"""The study's transforms, gathered in one place (as torchvision's references do)."""

from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_preset(image_size: int) -> T.Compose:
    """RandomResizedCrop(scale 0.8-1), flip, rotation 15, ColorJitter(0.2, 0.2, 0.2)."""
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.8, 1.0)),
        T.RandomHorizontalFlip(0.5),
        T.RandomRotation(15),
        T.ColorJitter(0.2, 0.2, 0.2),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_preset(image_size: int) -> T.Compose:
    """Resize((size, size)), ToTensor, Normalize: what scoring does to an aligned chip."""
    return T.Compose([
        T.Resize((image_size, image_size)),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
