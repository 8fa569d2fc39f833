"""Image loading for evaluation: colour-mode normalisation, the DeiT/timm eval transform, dataset listing.

This module knows nothing about models or the command line. It turns a folder of images into batches of
normalised tensors, and it never lets one unreadable file kill a long run silently or obscurely: a file
that cannot be decoded travels through the DataLoader (workers included) as a *bad* entry of the batch,
so that the main process can name it (:func:`check_bad`) or skip it.

Two folder layouts are understood (:func:`list_samples`):

* ``root/labels.tsv`` with rows ``file<TAB>class_index[<TAB>wnid<TAB>class_name]`` (``#`` comments, UTF-8
  with or without a byte-order mark), or
* an ImageFolder tree ``root/<class>/<image>`` whose sorted class folders are the class indices.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "Batch",
    "DataError",
    "EvalTransform",
    "ImageDataset",
    "Item",
    "Sample",
    "check_bad",
    "check_files",
    "check_labels",
    "collate",
    "list_samples",
    "load_image",
    "make_loader",
    "sample_loader",
    "to_rgb",
]

#: File extensions (lower case) taken as images in an ImageFolder tree.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

LABELS_FILE = "labels.tsv"

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

_WHITE = (255, 255, 255)


class DataError(ValueError):
    """A data set cannot be listed or read: bad folder, bad ``labels.tsv`` row, no images."""


class BadImageError(DataError):
    """An image file could not be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"cannot read image {path}: {reason}")
        self.path = path
        self.reason = reason


# --------------------------------------------------------------------------------------------------------
# Colour modes


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """Scale a 16-bit / 32-bit integer or float grayscale image to 8-bit ``L``.

    PIL's own ``convert("L")`` clips these values at 255, so a 16-bit image turns almost entirely white.
    The scaling used here:

    * ``I;16*`` (16-bit): divide by 257, so 0..65535 maps exactly onto 0..255.
    * ``I`` (32-bit int): the same when the values fit in 0..65535 (16-bit PNG/PGM/TIFF data decoded
      into ``I``, which is how PIL stores 16-bit PGM); otherwise stretch min..max to 0..255.
    * ``F`` (float): values in [0, 1] are multiplied by 255, values in [0, 255] are kept, anything
      else is stretched min..max to 0..255. NaN and infinities become 0.
    """
    arr = np.asarray(img).astype(np.float64)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        scaled = arr / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1.0:
        scaled = arr * 255.0
    elif img.mode == "F" and lo >= 0 and hi <= 255.0:
        scaled = arr
    elif hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an 8-bit RGB image, whatever mode PIL decoded it into.

    * 16/32-bit integer and float grayscale (``I;16``, ``I;16B``, ``I``, ``F``, ...) are scaled into
      0..255 (see :func:`_high_bit_to_l`) instead of being clipped to white as ``convert`` would.
    * Anything with transparency (``RGBA``, ``LA``, ``PA``, palette or grayscale with a ``tRNS``
      transparency entry) is composited over white, so transparent areas get one predictable colour
      rather than whatever RGB values happen to be stored under alpha 0.
    * Everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ...) goes through PIL's ``convert``.

    An image that is already RGB is returned as is (not copied).
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _high_bit_to_l(img).convert("RGB")
    has_alpha = "A" in img.getbands() or img.mode in ("RGBa", "La")
    if has_alpha or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open ``path``, decode all of its pixels and return it as RGB (:func:`to_rgb`).

    ``load()`` is forced so that a truncated file fails here (PIL decodes lazily; ``open`` alone only
    reads the header). ``ImageFile.LOAD_TRUNCATED_IMAGES`` is deliberately left off. Raises whatever PIL
    raises for an unreadable file (``OSError``/``UnidentifiedImageError`` mostly).
    """
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


# --------------------------------------------------------------------------------------------------------
# Transform


@dataclass(frozen=True)
class EvalTransform:
    """The timm/DeiT evaluation transform, in PIL + numpy + torch (torchvision is not a dependency).

    Resize the shorter side to ``int(input_size / crop_pct)`` (256 for 224 at 0.875; the longer side
    becomes ``int(new_short * long / short)`` as in torchvision), center-crop ``input_size`` with timm's
    rounding of the offset, scale to float [0, 1] and normalise by ``mean``/``std``. Returns a float32
    tensor of shape ``(3, input_size, input_size)``. Non-RGB input goes through :func:`to_rgb` first.
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if int(self.input_size) != self.input_size or self.input_size < 1:
            raise ValueError(f"input_size must be a positive integer, got {self.input_size!r}")
        if not self.crop_pct > 0:
            raise ValueError(f"crop_pct must be > 0, got {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; choose one of {sorted(INTERPOLATIONS)}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise ValueError(f"mean and std need 3 values each, std non-zero: {self.mean!r}, {self.std!r}")

    @property
    def resize_size(self) -> int:
        """Length the shorter side is resized to before cropping."""
        return int(self.input_size / self.crop_pct)

    def resize(self, img: Image.Image) -> Image.Image:
        """Resize the shorter side of ``img`` to :attr:`resize_size`, keeping the aspect ratio."""
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short = self.resize_size
        new_long = int(new_short * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        if size == img.size:
            return img
        return img.resize(size, INTERPOLATIONS[self.interpolation])

    def center_crop(self, img: Image.Image) -> Image.Image:
        """Crop the central ``input_size`` square; a side smaller than that is padded with black."""
        crop = self.input_size
        w, h = img.size
        left = int(round((w - crop) / 2.0)) if w >= crop else -((crop - w) // 2)
        top = int(round((h - crop) / 2.0)) if h >= crop else -((crop - h) // 2)
        return img.crop((left, top, left + crop, top + crop))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = self.center_crop(self.resize(to_rgb(img)))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        x = x.to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return x.sub_(mean).div_(std).contiguous()


# --------------------------------------------------------------------------------------------------------
# Listing


class Sample(NamedTuple):
    """One image file and its integer class label."""

    path: Path
    label: int


_LABEL_RE = re.compile(r"[0-9]+")


def _read_labels_tsv(root: Path) -> list[Sample]:
    """Parse ``root/labels.tsv``: 2 to 4 tab-separated columns, ``file`` relative to ``root``.

    Read as ``utf-8-sig``: a byte-order mark (spreadsheet tools write one) is not part of the first row.
    Missing image files are reported together, after every row has been read (:func:`check_files`).
    """
    tsv = root / LABELS_FILE
    samples, missing_at = [], []
    with tsv.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{tsv}:{lineno}"
            cols = line.split("\t")
            if not 2 <= len(cols) <= 4:
                raise DataError(
                    f"{where}: expected 2 to 4 tab-separated columns "
                    f"(file, class_index[, wnid, class_name]), got {len(cols)}"
                )
            name, label = cols[0].strip(), cols[1].strip()
            if not name:
                raise DataError(f"{where}: empty file name")
            if not _LABEL_RE.fullmatch(label):
                raise DataError(f"{where}: class_index must be a non-negative integer, got {label!r}")
            if not (root / name).is_file():
                missing_at.append(lineno)
            samples.append(Sample(root / name, int(label)))
    if missing_at:  # one line for all of them, at the first one's row
        check_files(f"{tsv}:{missing_at[0]}", samples, root)
    return samples


def check_files(what: str, samples: Sequence[Sample], folder: Path, show: int = 3) -> None:
    """Raise one :class:`DataError` saying how many of ``samples``' image files are missing under
    ``folder`` and naming the first ``show`` of them; nothing when every file is there."""
    missing = [s.path for s in samples if not s.path.is_file()]
    if not missing:
        return
    names = [str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p) for p in missing[:show]]
    more = ", ..." if len(missing) > show else ""
    raise DataError(
        f"{what}: {len(missing)} of {len(samples)} image files missing under {folder} "
        f"({', '.join(names)}{more})"
    )


def check_labels(samples: Sequence[Sample], num_classes: int) -> None:
    """Raise :class:`DataError` naming the first sample whose class index a ``num_classes``-way head
    cannot score; called before the first forward, so a mismatched checkpoint never yields a number."""
    for s in samples:
        if not 0 <= s.label < num_classes:
            raise DataError(
                f"{s.path}: class index {s.label} is not below the model's head size {num_classes} "
                f"(classes 0-{num_classes - 1}); use --weights whose head matches the data's labels"
            )


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _read_image_folder(root: Path) -> list[Sample]:
    """List an ImageFolder tree: class ``k`` is the ``k``-th sorted sub-folder (hidden ones ignored).

    Files are found recursively inside each class folder in torchvision's order (sorted directories,
    then sorted file names). Hidden files (e.g. macOS ``._x.jpg`` resource forks) are ignored.
    """
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    samples = []
    for label, cls in enumerate(classes):
        for dirpath, _, filenames in sorted(os.walk(root / cls, followlinks=True)):
            samples.extend(Sample(Path(dirpath) / f, label) for f in sorted(filenames) if _is_image(f))
    return samples


def list_samples(root: str | Path) -> list[Sample]:
    """List the images of a data set folder with their labels, in a fixed, reproducible order.

    If ``root/labels.tsv`` exists it defines the samples, in file order (see the module docstring);
    every row is checked and a bad one raises :class:`DataError` naming the file and line. Otherwise
    ``root`` is read as an ImageFolder tree, ordered by class, then file name.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"data folder is not a directory: {root}")
    if (root / LABELS_FILE).is_file():
        samples = _read_labels_tsv(root)
        if not samples:
            raise DataError(f"no images found: {root / LABELS_FILE} lists no files")
    else:
        samples = _read_image_folder(root)
        if not samples:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(
                f"no images found in {root}: expected {LABELS_FILE} or class sub-folders with {exts} files"
            )
    return samples


# --------------------------------------------------------------------------------------------------------
# Dataset, batches


class Item(NamedTuple):
    """What :class:`ImageDataset` returns for one index; ``error`` is ``None`` for a good image.

    For a bad image ``image`` is an empty ``(0, 3, H, W)`` placeholder (H, W from the transform's
    ``input_size`` when it has one, else 0) and ``error`` is ``"ExceptionType: message"``.
    """

    image: torch.Tensor
    label: int
    index: int
    path: str
    error: str | None


class Batch(NamedTuple):
    """A collated batch. ``bad`` lists ``(path, reason)`` of unreadable images, left out of the tensors."""

    images: torch.Tensor  # (B, 3, H, W) float32; B may be 0 when every image of the batch was bad
    labels: torch.Tensor  # (B,) int64
    indices: torch.Tensor  # (B,) int64, positions in the sample list
    bad: list[tuple[str, str]]


class ImageDataset(Dataset):
    """Samples + transform; an unreadable image yields a bad :class:`Item` instead of an exception.

    Raising inside a DataLoader worker would end the whole loop with a re-raised traceback from another
    process; returning a marked item instead lets the main process report (or skip) the exact file.
    Only decoding is guarded: an error in the transform of a decoded image is a bug and propagates.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def _placeholder(self) -> torch.Tensor:
        size = getattr(self.transform, "input_size", 0)
        size = size if isinstance(size, int) else 0
        return torch.empty((0, 3, size, size), dtype=torch.float32)

    def __getitem__(self, index: int) -> Item:
        path, label = self.samples[index]
        try:
            img = load_image(path)
        except Exception as exc:  # PIL raises many exception types; the reason is reported later
            reason = f"{type(exc).__name__}: {exc}"
            return Item(self._placeholder(), int(label), int(index), str(path), reason)
        return Item(self.transform(img), int(label), int(index), str(path), None)


def collate(batch: Sequence[Item]) -> Batch:
    """Stack the good items of ``batch`` into a :class:`Batch`; the bad ones go to ``Batch.bad``."""
    good = [it for it in batch if it.error is None]
    bad = [(it.path, it.error) for it in batch if it.error is not None]
    if good:
        images = torch.stack([it.image for it in good])
    elif batch:
        images = batch[0].image.new_empty((0, *batch[0].image.shape[1:]))
    else:
        images = torch.empty((0, 3, 0, 0))
    labels = torch.tensor([it.label for it in good], dtype=torch.int64)
    indices = torch.tensor([it.index for it in good], dtype=torch.int64)
    return Batch(images, labels, indices, bad)


def check_bad(batch: Batch, skip_bad: bool) -> int:
    """Deal with the unreadable images of ``batch``: raise, or count them.

    With ``skip_bad`` False and at least one bad image, raise :class:`BadImageError` naming the first
    one (path and reason). Otherwise return how many images of the batch were bad (0 if none).
    """
    if batch.bad and not skip_bad:
        path, reason = batch.bad[0]
        more = len(batch.bad) - 1
        message = f"cannot read image {path}: {reason}"
        if more:
            message += f" (and {more} more in this batch)"
        raise BadImageError(path, reason, message)
    return len(batch.bad)


def make_loader(
    root: str | Path,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 64,
    workers: int = 0,
    limit: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[DataLoader, list[Sample]]:
    """List ``root`` (:func:`list_samples`) and wrap it in an ordered DataLoader of :class:`Batch`.

    ``limit`` keeps the first ``limit`` samples in listing order; the rest is :func:`sample_loader`'s.
    """
    samples = list_samples(root)
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be a positive number of images, got {limit}")
        samples = samples[:limit]
    return sample_loader(samples, transform, batch_size, workers, shard)


def sample_loader(
    samples: Sequence[Sample],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 64,
    workers: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> tuple[DataLoader, list[Sample]]:
    """An ordered DataLoader of :class:`Batch` over ``samples`` (listed by any reader).

    ``shard=(rank, world)`` keeps every world-th sample from rank on (distributed evaluation: each image
    on exactly one process). There is no shuffling, so ``Batch.indices`` index the returned sample list.
    Workers are not persistent.
    """
    rank, world = shard
    samples = list(samples)[rank::world]
    loader = DataLoader(
        ImageDataset(samples, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
    )
    return loader, samples
