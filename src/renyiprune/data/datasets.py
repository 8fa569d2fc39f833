"""Training data sets read from their official on-disk layouts, and a checksum-verified downloader.

Each layout is turned into a :class:`DatasetSplit`: a list of ``data.Sample`` (path, 0-based label), the
number of classes, and how many pixels to crop off the bottom of every image (FGVC-Aircraft's banner).

* ``flowers102``: Oxford Flowers-102, ``jpg/image_00001.jpg``, ``imagelabels.mat`` (1-based labels of the
  8189 images) and ``setid.mat`` (1-based image ids: ``trnid`` train, ``valid`` val, ``tstid`` test).
* ``fgvc-aircraft``: FGVC-Aircraft 2013b, ``data/images/<id>.jpg``, ``data/images_variant_<split>.txt``
  (``<id> <variant>`` per line) and ``data/variants.txt`` (the 100 variants; line order = class index).
  Every image carries a 20-pixel copyright banner at the bottom, cropped off as the dataset's README says.
* ``imagenet100``: an ImageNet ``train/`` / ``val/`` tree of WordNet-id folders, restricted to the 100
  classes of Tian et al. 2019 (CMC) shipped as ``imagenet100.txt``; class index = sorted WordNet id.
* ``stanford-cars``: Stanford Cars (196 classes), read from either of two layouts (found automatically):
  the official devkit (``cars_train/``, ``cars_test/``, ``devkit/cars_train_annos.mat``,
  ``cars_test_annos_withlabels.mat`` at the root or in ``devkit/``, class names from
  ``devkit/cars_meta.mat``; splits ``train`` and ``test``; also inside a ``stanford_cars/`` folder), or
  split folders ``<split>/labels.tsv`` (``file, class_index, car_NNN, name``) with ``classes.txt``.
  The whole image is used (the devkit's bounding boxes are not applied).
* ``imagefolder`` / ``labels-tsv``: :func:`renyiprune.data.list_samples` on ``root/<split>`` when that
  folder exists, else on ``root`` itself (then the same images serve every split).
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from PIL import Image

from ..utils.io import DigestMismatch, DownloadError, LocalWriteError, download_verified, file_digest
from ..utils.optional import require
from .images import LABELS_FILE, DataError, Sample, check_files, list_samples, load_image

__all__ = [
    "DATASETS",
    "FOLDER_LAYOUTS",
    "NAMED_DATASETS",
    "DEFAULT_SPLITS",
    "AIRCRAFT_BANNER_PX",
    "DatasetSplit",
    "load_split",
    "open_sample",
    "imagenet100_classes",
    "download_dataset",
    "CARS_CLASSES",
    "TRANSFORMS",
    "ResizeTransform",
    "eval_transform",
]

DATASETS = ("imagefolder", "labels-tsv", "flowers102", "fgvc-aircraft", "imagenet100", "stanford-cars")
#: Layouts of any folder (not a data set one can fetch): DIR/labels.tsv or an ImageFolder tree.
FOLDER_LAYOUTS = ("imagefolder", "labels-tsv")
#: The named data sets, each in its official layout: what ``renyiprune download`` knows about.
NAMED_DATASETS = tuple(d for d in DATASETS if d not in FOLDER_LAYOUTS)
#: (training split, evaluation split) used when the command line names none.
DEFAULT_SPLITS = {
    "imagefolder": ("train", "val"),
    "labels-tsv": ("train", "val"),
    "flowers102": ("trainval", "test"),
    "fgvc-aircraft": ("trainval", "test"),
    "imagenet100": ("train", "val"),
    "stanford-cars": ("train", "test"),
}
AIRCRAFT_BANNER_PX = 20
CARS_CLASSES = 196


@dataclass
class DatasetSplit:
    """One split of a data set: samples with 0-based labels, class count/names, bottom crop in pixels."""

    name: str
    split: str
    root: Path
    samples: list[Sample]
    num_classes: int
    classes: list[str] = field(default_factory=list)
    crop_bottom: int = 0


def open_sample(sample: Sample | str | Path, crop_bottom: int = 0) -> Image.Image:
    """Decode one sample (or image file) as RGB, cropping ``crop_bottom`` pixel rows off the bottom."""
    path = sample.path if isinstance(sample, Sample) else Path(sample)
    img = load_image(path)
    if crop_bottom:
        w, h = img.size
        if h <= crop_bottom:
            raise DataError(f"{path}: image height {h} is not above the {crop_bottom}-pixel banner")
        img = img.crop((0, 0, w, h - crop_bottom))
    return img


def load_split(name: str, root: str | Path, split: str) -> DatasetSplit:
    """Read ``split`` of data set ``name`` (one of :data:`DATASETS`) from ``root``; DataError if it can't."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a directory")
    readers = {
        "imagefolder": _folder,
        "labels-tsv": _folder,
        "flowers102": _flowers102,
        "fgvc-aircraft": _aircraft,
        "imagenet100": _imagenet100,
        "stanford-cars": _cars,
    }
    if name not in readers:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    ds = readers[name](name, root, split)
    if not ds.samples:
        raise DataError(f"{name} split {split!r} under {root} holds no images")
    return ds


# ------------------------------------------------------------------------------------- ImageFolder, tsv


def _folder(name: str, root: Path, split: str) -> DatasetSplit:
    folder = root / split if (root / split).is_dir() else root
    if name == "labels-tsv" and not (folder / LABELS_FILE).is_file():
        raise DataError(f"labels-tsv: no {LABELS_FILE} in {folder}")
    if name == "imagefolder" and (folder / LABELS_FILE).is_file():
        raise DataError(f"imagefolder: {folder} holds a {LABELS_FILE}; use --dataset labels-tsv")
    samples = list_samples(folder)
    classes: list[str] = []
    if name == "imagefolder":
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    num = max(len(classes), 1 + max(s.label for s in samples))
    return DatasetSplit(name, split, folder, samples, num, classes)


# ------------------------------------------------------------------------------------------ Flowers-102

_FLOWERS_SPLITS = {"train": ("trnid",), "val": ("valid",), "test": ("tstid",), "trainval": ("trnid", "valid")}


def _flowers102(name: str, root: Path, split: str) -> DatasetSplit:
    loadmat = require("scipy.io", "reading Flowers-102's .mat files", "datasets").loadmat

    if split not in _FLOWERS_SPLITS:
        raise DataError(f"flowers102 splits are {', '.join(_FLOWERS_SPLITS)}; got {split!r}")
    for f in ("imagelabels.mat", "setid.mat", "jpg"):
        if not (root / f).exists():
            raise DataError(f"flowers102: {root / f} not found (expected jpg/, imagelabels.mat, setid.mat)")
    labels = loadmat(root / "imagelabels.mat")["labels"].ravel().astype(int)  # 1-based, one per image
    setid = loadmat(root / "setid.mat")
    ids = [int(i) for key in _FLOWERS_SPLITS[split] for i in setid[key].ravel()]  # 1-based image ids
    samples = []
    for i in sorted(ids):
        if not 1 <= i <= len(labels):
            raise DataError(f"flowers102: setid.mat names image {i} but imagelabels.mat has {len(labels)}")
        samples.append(Sample(root / "jpg" / f"image_{i:05d}.jpg", int(labels[i - 1]) - 1))
    check_files(f"flowers102 {split}", samples, root / "jpg")
    return DatasetSplit(name, split, root, samples, 102, [str(k) for k in range(1, 103)])


# ---------------------------------------------------------------------------------------- FGVC-Aircraft

_AIRCRAFT_SPLITS = ("train", "val", "trainval", "test")


def _aircraft(name: str, root: Path, split: str) -> DatasetSplit:
    if split not in _AIRCRAFT_SPLITS:
        raise DataError(f"fgvc-aircraft splits are {', '.join(_AIRCRAFT_SPLITS)}; got {split!r}")
    if not (root / "data").is_dir() and (root / "fgvc-aircraft-2013b" / "data").is_dir():
        root = root / "fgvc-aircraft-2013b"
    data = root / "data"
    listing, variants_file = data / f"images_variant_{split}.txt", data / "variants.txt"
    for f in (listing, variants_file, data / "images"):
        if not f.exists():
            raise DataError(f"fgvc-aircraft: {f} not found (expected the fgvc-aircraft-2013b data/ folder)")
    classes = [v.strip() for v in variants_file.read_text(encoding="utf-8").splitlines() if v.strip()]
    index = {v: k for k, v in enumerate(classes)}
    samples = []
    for lineno, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        if variant not in index:
            raise DataError(f"{listing}:{lineno}: variant {variant!r} is not in {variants_file.name}")
        samples.append(Sample(data / "images" / f"{image_id}.jpg", index[variant]))
    check_files(f"fgvc-aircraft {split} ({listing.name})", samples, data / "images")
    return DatasetSplit(name, split, root, samples, len(classes), classes, crop_bottom=AIRCRAFT_BANNER_PX)


# ----------------------------------------------------------------------------------------- ImageNet-100


def imagenet100_classes() -> list[str]:
    """The 100 WordNet ids of ImageNet-100 (CMC), sorted: position = class index."""
    text = resources.files("renyiprune.data").joinpath("imagenet100.txt").read_text(encoding="utf-8")
    return sorted(w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#"))


def _imagenet100(name: str, root: Path, split: str) -> DatasetSplit:
    folder = root / split
    if not folder.is_dir():
        raise DataError(
            f"imagenet100: {folder} not found (expected {root}/train and {root}/val class folders)"
        )
    classes = imagenet100_classes()
    missing = [w for w in classes if not (folder / w).is_dir()]
    if missing:
        raise DataError(
            f"imagenet100: {len(missing)} of the 100 class folders are missing in {folder}: "
            + ", ".join(missing[:5])
            + (" ..." if len(missing) > 5 else "")
        )
    samples = []
    for label, wnid in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(folder / wnid, followlinks=True)):
            samples.extend(
                Sample(Path(dirpath) / f, label)
                for f in sorted(files)
                if not f.startswith(".") and Path(f).suffix.lower() in {".jpeg", ".jpg", ".png"}
            )
    return DatasetSplit(name, split, folder, samples, 100, classes)


# ---------------------------------------------------------------------------------------- Stanford Cars

_CARS_ANNOS = {"train": "cars_train_annos.mat", "test": "cars_test_annos_withlabels.mat"}
CARS_PLACEMENT = (
    "place the official devkit layout in DIR: DIR/cars_train/*.jpg, DIR/cars_test/*.jpg, "
    "DIR/devkit/cars_train_annos.mat, DIR/devkit/cars_meta.mat and DIR/cars_test_annos_withlabels.mat "
    "(or in DIR/devkit/) - or split folders DIR/<split>/labels.tsv (file, class_index 0-195, car_NNN, "
    "class name) next to DIR/classes.txt - and pass --dataset stanford-cars --data-root DIR"
)


def _cars(name: str, root: Path, split: str) -> DatasetSplit:
    if not (root / "devkit").is_dir() and (root / "stanford_cars" / "devkit").is_dir():
        root = root / "stanford_cars"  # torchvision's folder name
    if (root / "devkit").is_dir() or (root / "cars_train").is_dir():
        return _cars_devkit(name, root, split)
    folder = root / split
    if (folder / LABELS_FILE).is_file():
        samples = list_samples(folder)
        classes = _cars_classes_txt(root)
        bad = [s for s in samples if not 0 <= s.label < len(classes)]
        if bad:
            raise DataError(f"stanford-cars: {folder / LABELS_FILE} has class {bad[0].label}, not in 0-195")
        return DatasetSplit(name, split, folder, samples, len(classes), classes)
    have = sorted(p.name for p in root.iterdir() if (p / LABELS_FILE).is_file()) if root.is_dir() else []
    if have:
        raise DataError(f"stanford-cars: no split {split!r} in {root} (it has: {', '.join(have)})")
    raise DataError(f"stanford-cars: {root} holds neither layout; {CARS_PLACEMENT}")


def _cars_classes_txt(root: Path) -> list[str]:
    f = root / "classes.txt"
    if not f.is_file():
        return [f"car_{i:03d}" for i in range(1, CARS_CLASSES + 1)]
    classes = [c.strip() for c in f.read_text(encoding="utf-8").splitlines() if c.strip()]
    if len(classes) != CARS_CLASSES:
        raise DataError(f"stanford-cars: {f} lists {len(classes)} classes, expected {CARS_CLASSES}")
    return classes


def _mat_records(path: Path, key: str):
    """The 1-d array of struct records stored under ``key`` in a MATLAB file."""
    import numpy as np

    loadmat = require("scipy.io", "reading MATLAB .mat files", "datasets").loadmat

    try:
        mat = loadmat(path, squeeze_me=True)
    except Exception as e:  # scipy raises ValueError/TypeError/OSError for files it cannot read
        raise DataError(f"stanford-cars: cannot read {path}: {e}") from None
    if key not in mat:
        have = ", ".join(k for k in mat if not k.startswith("_"))
        raise DataError(f"stanford-cars: {path} has no {key!r} (it has: {have})")
    return np.atleast_1d(mat[key])


def _cars_devkit(name: str, root: Path, split: str) -> DatasetSplit:
    if split not in _CARS_ANNOS:
        raise DataError(f"stanford-cars (devkit layout) splits are train, test; got {split!r}")
    annos_name = _CARS_ANNOS[split]
    found = [p for p in (root / "devkit" / annos_name, root / annos_name) if p.is_file()]
    if not found:
        raise DataError(
            f"stanford-cars: {annos_name} not found in {root / 'devkit'} or {root}; {CARS_PLACEMENT}"
        )
    meta = root / "devkit" / "cars_meta.mat"
    if not meta.is_file():
        raise DataError(f"stanford-cars: {meta} not found (the class names); {CARS_PLACEMENT}")
    classes = [str(c).strip() for c in _mat_records(meta, "class_names")]
    annos = _mat_records(found[0], "annotations")
    fields = annos.dtype.names or ()
    if "fname" not in fields or "class" not in fields:
        raise DataError(
            f"stanford-cars: {found[0]} annotations lack fname/class (fields: {', '.join(fields)}); "
            "the test split needs cars_test_annos_withlabels.mat, not cars_test_annos.mat"
        )
    images = root / f"cars_{split}"
    samples = []
    for rec in annos:
        fname, cls = str(rec["fname"]).strip(), int(rec["class"])
        if not 1 <= cls <= len(classes):
            raise DataError(f"stanford-cars: {found[0]}: {fname} has class {cls}, not in 1-{len(classes)}")
        samples.append(Sample(images / fname, cls - 1))
    check_files(f"stanford-cars {split}", samples, images)
    return DatasetSplit(name, split, images, samples, len(classes), classes)


# ------------------------------------------------------------------------------------ fine-grained eval

#: Evaluation transforms: ``center-crop`` is the model's own (shorter side to input/crop_pct, center
#: crop); ``resize`` scales the whole image to input x input, so nothing of the object is cut off.
TRANSFORMS = ("center-crop", "resize")


@dataclass(frozen=True)
class ResizeTransform:
    """The whole image resized to ``input_size`` x ``input_size`` (aspect ratio not kept), normalized.

    For fine-grained objects that fill a wide frame (a car seen from the side): a center crop of the
    shorter side cuts off the front and the back, where the distinguishing parts often are.
    """

    input_size: int = 224
    interpolation: str = "bicubic"
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    def __call__(self, img: Image.Image):
        import numpy as np
        import torch

        from .images import INTERPOLATIONS, to_rgb

        img = to_rgb(img)
        size = (self.input_size, self.input_size)
        if img.size != size:
            img = img.resize(size, INTERPOLATIONS[self.interpolation])
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return x.sub_(mean).div_(std).contiguous()


@dataclass(frozen=True)
class BannerCropped:
    """An evaluation transform that first cuts ``crop_bottom`` pixel rows off (FGVC-Aircraft's banner)."""

    transform: Callable
    crop_bottom: int

    @property
    def input_size(self) -> int:
        return getattr(self.transform, "input_size", 0)

    def __call__(self, img: Image.Image):
        if self.crop_bottom:
            img = img.crop((0, 0, img.width, img.height - self.crop_bottom))
        return self.transform(img)


def eval_transform(kind: str, cfg):
    """The evaluation transform ``kind`` (one of :data:`TRANSFORMS`) for a model's ``pretrained_cfg``."""
    from .images import EvalTransform

    if kind == "center-crop":
        return EvalTransform(cfg.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
    if kind == "resize":
        return ResizeTransform(cfg.img_size, cfg.interpolation, tuple(cfg.mean), tuple(cfg.std))
    raise ValueError(f"unknown transform {kind!r}; choose from {', '.join(TRANSFORMS)}")


# ------------------------------------------------------------------------------------------- downloads


@dataclass(frozen=True)
class Remote:
    """One published file: URL and the MD5 that the common loaders (torchvision, R torch, ...) verify."""

    url: str
    md5: str
    extract: bool = False


_VGG = "https://www.robots.ox.ac.uk/~vgg/data/"
DOWNLOADS = {
    "flowers102": [
        Remote(_VGG + "flowers/102/102flowers.tgz", "52808999861908f626f3c1f4e79d11fa", extract=True),
        Remote(_VGG + "flowers/102/imagelabels.mat", "e0620be6f572b9609742df49c70aed4d"),
        Remote(_VGG + "flowers/102/setid.mat", "a5357ecc9cb78c4bef273ce3793fc85c"),
    ],
    "fgvc-aircraft": [
        Remote(
            _VGG + "fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
            "d4acdd33327262359767eeaa97a4f732",
            extract=True,
        ),
    ],
}


def download_dataset(name: str, root: str | Path, progress: bool = True) -> Path:
    """Download and unpack data set ``name`` into ``root``; every file is MD5-checked before it is kept.

    Each file is streamed to a temporary name and renamed into place only after its checksum verifies;
    archives are unpacked into a temporary folder that is renamed into place when complete. ImageNet
    needs a registered account, so ``imagenet100`` raises a DataError explaining how to lay it out.
    """
    root = Path(root).expanduser()
    if name == "stanford-cars":
        raise DataError(
            "Stanford Cars cannot be downloaded: its official links (ai.stanford.edu/~jkrause/cars) are gone "
            "and no verified mirror is known. Obtain the files elsewhere and "
            + CARS_PLACEMENT.replace("DIR", str(root))
        )
    if name == "imagenet100":
        raise DataError(
            "ImageNet cannot be downloaded without an image-net.org account: download ILSVRC2012 train/val "
            "yourself, lay it out as DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG, and train with "
            "--dataset imagenet100 --data-root DIR (only the 100 CMC classes are read)"
        )
    if name not in DOWNLOADS:
        raise DataError(
            f"no download for {name!r}; downloadable: {', '.join(DOWNLOADS)} (imagenet100 and stanford-cars: "
            "the command says how to lay them out)"
        )
    root.mkdir(parents=True, exist_ok=True)
    for remote in DOWNLOADS[name]:
        target = root / Path(remote.url).name
        if not (target.is_file() and _md5(target) == remote.md5):
            _fetch_verified(remote, target, progress)
        if remote.extract:
            _extract(target, root)
    return root


def _md5(path: Path) -> str:
    return file_digest(path, "md5")


def _fetch_verified(remote: Remote, target: Path, progress: bool) -> None:
    try:
        download_verified(remote.url, target, remote.md5, kind="md5", progress=progress)
    except DownloadError as e:
        raise DataError(
            f"could not download {remote.url}: {e.why}. Download it on a machine with access, copy it to "
            f"{target} and rerun (it is checksum-verified and unpacked), or unpack it yourself and pass "
            "--data-root."
        ) from None
    except DigestMismatch as e:
        raise DataError(f"{e}; the download was discarded") from None
    except LocalWriteError as e:
        raise DataError(f"cannot write the download: {e}") from e


def _extract(archive: Path, root: Path) -> None:
    """Unpack ``archive`` into ``root`` through a temporary folder; top-level entries already there stay."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract.", dir=root))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        for entry in tmp.iterdir():
            if not (root / entry.name).exists():
                os.replace(entry, root / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"renyiprune: unpacked {archive.name} into {root}", file=sys.stderr)
