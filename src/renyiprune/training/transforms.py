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

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image
from torch import Tensor

from ..data.augment import TrainTransform
from ..data.datasets import TRANSFORMS, BannerCropped, eval_transform

__all__ = ["TRANSFORMS", "WholeImageTrainTransform", "BannerCropped", "train_transform", "eval_view"]


@dataclass
class WholeImageTrainTransform(TrainTransform):
    """DeiT's training pipeline (:class:`TrainTransform`) on a random box of the image's own frame: its
    aspect ratio is ``ratio`` times the image's, so ``scale=(1, 1)`` gives the whole image squashed to
    S x S, the evaluation's whole-image view (flipped or not)."""

    relative_ratio: bool = True


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


def eval_view(kind: str, pretrained_cfg, crop_bottom: int = 0) -> BannerCropped:
    """The evaluation transform of ``kind`` (``data.datasets.eval_transform``), banner cropped first."""
    return BannerCropped(eval_transform(kind, pretrained_cfg), crop_bottom)
