"""What the model sees while it trains and when it is evaluated: one ``--transform`` names both.

* ``center-crop`` (default): DeiT's recipe. Training takes a random-resized crop of the image
  (area ``crop_scale``-1, aspect 3/4-4/3) and flips it; evaluation resizes the shorter side and takes
  the center crop (the model's own ``crop_pct``).
* ``resize``: for fine-grained objects that fill a wide frame (cars). Evaluation resizes the whole
  image to input x input (``data.datasets.ResizeTransform``, what ``renyiprune probe`` uses by default);
  training takes a random box of the image whose area is ``crop_scale``-1 of it and whose aspect ratio
  is 3/4-4/3 times the image's own, and resizes it to input x input the same way, so the full box is
  exactly the evaluation view.

Both then apply the same RandAugment, normalisation and random erasing (``data.augment.TrainTransform``),
each image seeded by an integer, so an epoch is reproduced exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch import Tensor

from ..data.augment import TrainTransform, random_resized_crop_box
from ..data.datasets import TRANSFORMS, eval_transform
from ..data.images import INTERPOLATIONS, to_rgb

__all__ = ["TRANSFORMS", "WholeImageTrainTransform", "BannerCropped", "train_transform", "eval_view"]


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@dataclass
class WholeImageTrainTransform:
    """PIL image + seed -> normalised (3, S, S) tensor: a random box of the image's own frame, squashed
    to S x S like the evaluation's whole-image resize, flipped with probability ``hflip``, then
    RandAugment / normalisation / random erasing as :class:`TrainTransform`.

    ``scale`` bounds the box's share of the image area; ``ratio`` its aspect ratio relative to the
    image's. ``scale=(1, 1)`` gives the whole image: the evaluation view (flipped or not).
    """

    input_size: int = 224
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaug_n: int = 2
    randaug_m: float = 9.0
    reprob: float = 0.25

    def __post_init__(self) -> None:
        # On an S x S image with scale = ratio = (1, 1) and no flip, TrainTransform's crop is the
        # identity: what is left is its photometric part.
        self._photometric = TrainTransform(
            self.input_size, self.mean, self.std, self.interpolation, scale=(1.0, 1.0), ratio=(1.0, 1.0),
            hflip=0.0, randaug_n=self.randaug_n, randaug_m=self.randaug_m, reprob=self.reprob,
        )  # fmt: skip

    def __call__(self, img: Image.Image, seed: int) -> Tensor:
        rng = random.Random(seed)
        img = to_rgb(img)
        width, height = img.size
        aspect = width / height
        ratio = (self.ratio[0] * aspect, self.ratio[1] * aspect)
        left, top, w, h = random_resized_crop_box(width, height, self.scale, ratio, rng)
        size = (self.input_size, self.input_size)
        img = img.resize(size, INTERPOLATIONS[self.interpolation], box=(left, top, left + w, top + h))
        if rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self._photometric(img, _seed_of(seed, 1))


def train_transform(
    kind: str,
    pretrained_cfg,
    *,
    crop_scale: float = 0.08,
    randaug_n: int = 2,
    randaug_m: float = 9.0,
    reprob: float = 0.25,
    train_crop: bool = True,
) -> Callable[[Image.Image, int], Tensor]:
    """The training transform of ``kind`` (one of :data:`TRANSFORMS`) for a model's ``pretrained_cfg``."""
    if not 0 < crop_scale <= 1:
        raise ValueError(f"--crop-scale must be in (0, 1], got {crop_scale}")
    pc = pretrained_cfg
    common = dict(hflip=0.5, randaug_n=randaug_n, randaug_m=randaug_m, reprob=reprob)
    if kind == "center-crop":
        return TrainTransform(pc.img_size, pc.mean, pc.std, pc.interpolation, scale=(crop_scale, 1.0),
                              train_crop=train_crop, **common)  # fmt: skip
    if kind == "resize":
        return WholeImageTrainTransform(pc.img_size, tuple(pc.mean), tuple(pc.std), pc.interpolation,
                                        scale=(crop_scale, 1.0), **common)  # fmt: skip
    raise ValueError(f"unknown transform {kind!r}; choose from {', '.join(TRANSFORMS)}")


@dataclass(frozen=True)
class BannerCropped:
    """An evaluation transform that first crops the data set's bottom banner (FGVC-Aircraft)."""

    transform: Callable[[Image.Image], Tensor]
    crop_bottom: int

    @property
    def input_size(self) -> int:
        return self.transform.input_size

    def __call__(self, img: Image.Image) -> Tensor:
        if self.crop_bottom:
            img = img.crop((0, 0, img.width, img.height - self.crop_bottom))
        return self.transform(img)


def eval_view(kind: str, pretrained_cfg, crop_bottom: int = 0) -> BannerCropped:
    """The evaluation transform of ``kind`` (``data.datasets.eval_transform``), banner cropped first."""
    return BannerCropped(eval_transform(kind, pretrained_cfg), crop_bottom)
