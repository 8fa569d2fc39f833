"""DeiT-style training augmentation: random-resized crop + flip, RandAugment, random erasing, mixup/cutmix.

Per-image augmentation (:class:`TrainTransform`) is a pure function of the image and an integer seed, so
an epoch is reproduced exactly whatever the number of DataLoader workers, processes or restarts. The
photometric/geometric operations come from kornia (pure torch); the crop, the flip and mixup/cutmix are
small code here because they need timm's exact sampling rules.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..utils.optional import require
from .images import INTERPOLATIONS, EvalTransform, to_rgb

__all__ = [
    "TrainTransform",
    "random_resized_crop_box",
    "mixup_cutmix",
    "smooth_one_hot",
    "soft_target_cross_entropy",
]


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, w, h): 10 tries of area/aspect, then a center crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass
class TrainTransform:
    """PIL image + seed -> normalised (3, S, S) float tensor, DeiT's training pipeline.

    RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3, bicubic) and horizontal flip, then kornia's
    RandAugment with ``randaug_n`` operations at magnitude ``randaug_m`` out of timm's 10 (kornia counts
    to 30), normalisation, then random erasing with probability ``reprob`` (filled with per-pixel normal
    noise, timm's ``mode="pixel"``). ``randaug_n=0`` / ``reprob=0`` switch those off; ``train_crop=False``
    uses the evaluation resize + center crop instead of the random crop and flip (for exactness tests).
    ``relative_ratio=True`` reads ``ratio`` relative to the image's aspect ratio (the whole-image view
    for fine-grained data: ``scale=(1, 1)`` is the whole image squashed to S x S).
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
    train_crop: bool = True
    relative_ratio: bool = False  # ratio bounds relative to the image's own aspect (whole-image view)

    def __post_init__(self) -> None:
        self._randaug = None
        if self.randaug_n > 0:
            auto = require("kornia.augmentation.auto", "RandAugment (--randaug)", "train")
            RandAugment = auto.RandAugment  # noqa: N806

            m = min(max(self.randaug_m * 3.0, 1e-3), 29.999)  # timm's 0-10 scale onto kornia's (0, 30)
            self._randaug = RandAugment(n=self.randaug_n, m=m)

    def __call__(self, img: Image.Image, seed: int) -> Tensor:
        rng = random.Random(seed)
        img = to_rgb(img)
        size = (self.input_size, self.input_size)
        if self.train_crop:
            ratio = self.ratio
            if self.relative_ratio:  # scale=(1, 1) then boxes the whole frame: the squashed whole image
                aspect = img.width / img.height
                ratio = (ratio[0] * aspect, ratio[1] * aspect)
            left, top, w, h = random_resized_crop_box(*img.size, self.scale, ratio, rng)
            img = img.resize(size, INTERPOLATIONS[self.interpolation], box=(left, top, left + w, top + h))
            if rng.random() < self.hflip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            ev = EvalTransform(self.input_size, interpolation=self.interpolation)
            img = ev.center_crop(ev.resize(img))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        with torch.random.fork_rng(devices=[]):  # kornia draws from the global generator: keep it untouched
            torch.manual_seed(seed)
            if self._randaug is not None:
                x = self._randaug(x[None])[0].clamp_(0.0, 1.0)
            mean = torch.tensor(self.mean).view(3, 1, 1)
            std = torch.tensor(self.std).view(3, 1, 1)
            x = (x - mean) / std
            if self.reprob > 0 and rng.random() < self.reprob:
                x = _erase(x, rng)
        return x.contiguous()


def _erase(x: Tensor, rng: random.Random, scale=(0.02, 1 / 3), ratio=(0.3, 3.3)) -> Tensor:
    """timm's RandomErasing (one box, mode "pixel"): a random box filled with standard normal noise."""
    _, h, w = x.shape
    for _ in range(10):
        target = rng.uniform(*scale) * h * w
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if eh < h and ew < w:
            top, left = rng.randint(0, h - eh), rng.randint(0, w - ew)
            x = x.clone()
            x[:, top : top + eh, left : left + ew] = torch.randn(x.shape[0], eh, ew)
            return x
    return x


def smooth_one_hot(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """One-hot targets with label smoothing: 1 - s + s/K on the label, s/K elsewhere (timm's rule)."""
    off = smoothing / num_classes
    out = torch.full((y.shape[0], num_classes), off, device=y.device)
    return out.scatter_(1, y[:, None], 1.0 - smoothing + off)


def mixup_cutmix(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    rng: np.random.Generator,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """timm's batch-mode Mixup: mix the batch with its reverse; returns (images, soft targets).

    With both alphas > 0, cutmix is chosen with probability ``switch_prob``. lam ~ Beta(alpha, alpha);
    cutmix pastes a box of area (1 - lam) from the reversed batch and corrects lam to the clipped box.
    Targets are ``lam * onehot(y) + (1 - lam) * onehot(reversed y)``, label-smoothed by ``smoothing``.
    """
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    if alpha <= 0:
        return x, smooth_one_hot(y, num_classes, smoothing)
    lam = float(rng.beta(alpha, alpha))
    flipped = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
        x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - float((y1 - y0) * (x1 - x0)) / (h * w)
    else:
        x = x * lam + flipped * (1.0 - lam)
    t1 = smooth_one_hot(y, num_classes, smoothing)
    t2 = smooth_one_hot(y.flip(0), num_classes, smoothing)
    return x, t1 * lam + t2 * (1.0 - lam)


def soft_target_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of -sum(target * log_softmax(logits)) (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
