"""Stanford Cars: the official devkit layout (tiny .mat files written here), the shipped labels.tsv
layout, the download that cannot happen, and the whole-image evaluation transform."""

import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from renyiprune.cli import main
from renyiprune.data import datasets as ds
from renyiprune.data.images import DataError, EvalTransform


def _annotations(rows, with_class=True):
    """A 1 x N MATLAB struct array with the devkit's fields (bbox_x1..bbox_y2, class, fname)."""
    names = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    rec = np.zeros((1, len(rows)), dtype=[(n, "O") for n in names])
    for i, (fname, cls) in enumerate(rows):
        vals = [np.array([[v]], dtype=np.uint16) for v in (3, 5, 60, 40)]
        if with_class:
            vals.append(np.array([[cls]], dtype=np.uint8))
        vals.append(np.array([fname]))
        rec[0, i] = tuple(vals)
    return rec


@pytest.fixture
def devkit(tmp_path):
    """A devkit tree with 3 classes: 3 training and 2 test images (real pixels are not needed here)."""
    from scipy.io import savemat

    files = {"train": ["00001.jpg", "00002.jpg", "00003.jpg"], "test": ["00001.jpg", "00002.jpg"]}
    for split, names in files.items():
        (tmp_path / f"cars_{split}").mkdir()
        for k, n in enumerate(names):
            Image.new("RGB", (64, 40), (40 * k, 90, 200)).save(tmp_path / f"cars_{split}" / n)
    (tmp_path / "devkit").mkdir()
    classes = np.empty((1, 3), dtype=object)
    classes[0, :] = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    savemat(tmp_path / "devkit" / "cars_meta.mat", {"class_names": classes})
    savemat(tmp_path / "devkit" / "cars_train_annos.mat",
            {"annotations": _annotations([("00001.jpg", 3), ("00002.jpg", 1), ("00003.jpg", 2)])})
    savemat(tmp_path / "cars_test_annos_withlabels.mat",
            {"annotations": _annotations([("00002.jpg", 2), ("00001.jpg", 3)])})
    return tmp_path


def test_devkit_layout_labels_are_zero_based_and_names_come_from_meta(devkit):
    train = ds.load_split("stanford-cars", devkit, "train")
    got = [(s.path.name, s.label) for s in train.samples]
    assert got == [("00001.jpg", 2), ("00002.jpg", 0), ("00003.jpg", 1)]
    assert train.samples[0].path.parent.name == "cars_train"
    assert train.num_classes == 3 and train.classes[1] == "Acura RL Sedan 2012"
    test = ds.load_split("stanford-cars", devkit, "test")
    assert [(s.path.parent.name, s.path.name, s.label) for s in test.samples] == [
        ("cars_test", "00002.jpg", 1), ("cars_test", "00001.jpg", 2)]
    assert ds.DEFAULT_SPLITS["stanford-cars"] == ("train", "test")


def test_devkit_layout_inside_a_stanford_cars_folder_and_test_annos_in_devkit(devkit, tmp_path_factory):
    outer = tmp_path_factory.mktemp("outer")
    devkit.rename(outer / "stanford_cars")
    root = outer / "stanford_cars"
    (root / "cars_test_annos_withlabels.mat").rename(root / "devkit" / "cars_test_annos_withlabels.mat")
    assert len(ds.load_split("stanford-cars", outer, "test").samples) == 2


def test_devkit_layout_errors_name_the_problem(devkit):
    from scipy.io import savemat

    with pytest.raises(DataError, match="splits are train, test"):
        ds.load_split("stanford-cars", devkit, "val")
    # the unlabelled test annotations (the original devkit's cars_test_annos.mat) have no class field
    unlabelled = _annotations([("00001.jpg", 0)], with_class=False)
    savemat(devkit / "cars_test_annos_withlabels.mat", {"annotations": unlabelled})
    with pytest.raises(DataError, match="lack fname/class"):
        ds.load_split("stanford-cars", devkit, "test")
    savemat(devkit / "devkit" / "cars_train_annos.mat", {"annotations": _annotations([("00001.jpg", 4)])})
    with pytest.raises(DataError, match="class 4, not in 1-3"):
        ds.load_split("stanford-cars", devkit, "train")
    savemat(devkit / "devkit" / "cars_train_annos.mat", {"annotations": _annotations([("09999.jpg", 1)])})
    with pytest.raises(DataError, match=r"stanford-cars train: 1 of 1 image files missing .*\(09999.jpg\)"):
        ds.load_split("stanford-cars", devkit, "train")
    (devkit / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(DataError, match="cars_meta.mat not found"):
        ds.load_split("stanford-cars", devkit, "train")


def test_shipped_layout(shared_assets):
    root = shared_assets / "stanford-cars"
    train = ds.load_split("stanford-cars", root, "train")
    val = ds.load_split("stanford-cars", root, "val")
    names = [n.strip() for n in (root / "classes.txt").read_text().splitlines() if n.strip()]
    assert train.num_classes == 196 and train.classes == names
    assert (len(train.samples), len(val.samples)) == (4893, 1221)  # the README's counts
    # the class name in labels.tsv (4th column) is the classes.txt entry of the class index
    first = (root / "train" / "labels.tsv").read_text().splitlines()[1].split("\t")
    assert train.samples[0].path.name == first[0].split("/")[-1] and train.classes[int(first[1])] == first[3]
    assert {s.label for s in train.samples} == set(range(196))
    with pytest.raises(DataError, match="no split 'test'.*train, val"):
        ds.load_split("stanford-cars", root, "test")


def test_neither_layout(tmp_path):
    with pytest.raises(DataError, match="neither layout.*cars_train"):
        ds.load_split("stanford-cars", tmp_path, "train")


def test_download_says_where_to_put_the_files_and_touches_no_network(tmp_path, monkeypatch, capsys):
    def no_network(*a, **k):
        raise AssertionError("the network was used")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    root = tmp_path / "cars"
    with pytest.raises(DataError, match="links.*gone") as e:
        ds.download_dataset("stanford-cars", root)
    parts = ("cars_train", "cars_test_annos_withlabels.mat", "cars_meta.mat", "labels.tsv", "classes.txt")
    for part in parts:
        assert part in str(e.value)
    assert not root.exists()
    assert main(["download", "stanford-cars", "--root", str(root)]) == 2
    assert "--dataset stanford-cars --data-root" in capsys.readouterr().err


def test_resize_transform_keeps_the_whole_image():
    # A wide image with a red strip at its left end: the whole-image resize keeps it, a center crop cuts it.
    arr = np.full((120, 300, 3), 128, dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    img = Image.fromarray(arr)
    tf = ds.ResizeTransform(224)
    x = tf(img)
    assert x.shape == (3, 224, 224)
    # independent reference: PIL bicubic resize of the whole image, then ImageNet mean/std in float64
    ref = np.asarray(img.resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    ref = (ref - np.array(tf.mean)) / np.array(tf.std)
    assert np.abs(x.permute(1, 2, 0).double().numpy() - ref).max() < 1e-5  # float32 rounding of [0, 1] data
    red = (1.0 - tf.mean[0]) / tf.std[0]
    assert torch.allclose(x[0, :, 0], torch.full((224,), red), atol=1e-5)
    crop = EvalTransform(224)(img)
    assert crop[0, :, 0].max() < red - 1.0  # the crop starts well inside the grey part


def test_eval_transform_kinds():
    from renyiprune.models.model import get_spec

    spec = get_spec("deit_tiny_patch16_224")
    assert isinstance(ds.eval_transform("center-crop", spec), EvalTransform)
    assert ds.eval_transform("resize", spec) == ds.ResizeTransform(224, "bicubic", spec.mean, spec.std)
    with pytest.raises(ValueError, match="unknown transform"):
        ds.eval_transform("squash", spec)
