"""Training data sets in their official layouts (tiny trees of real photos), downloads, augmentation."""

import io
import random
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from renyiprune.data import datasets as ds
from renyiprune.data.augment import TrainTransform, mixup_cutmix, random_resized_crop_box
from renyiprune.data.images import DataError


@pytest.fixture(scope="module")
def photos(shared_assets):
    """Eight real photos, shrunk to at most 96 px so the tests decode quickly."""
    src = sorted((shared_assets / "imagenet-sample-1000" / "images").glob("*.JPEG"))[:8]
    out = []
    for p in src:
        img = Image.open(p).convert("RGB")
        img.thumbnail((96, 96))
        out.append(img)
    return out


def test_flowers102_official_layout(tmp_path, photos):
    from scipy.io import savemat

    (tmp_path / "jpg").mkdir()
    for i, img in enumerate(photos[:6], start=1):
        img.save(tmp_path / "jpg" / f"image_{i:05d}.jpg")
    savemat(tmp_path / "imagelabels.mat", {"labels": np.array([[1, 2, 102, 1, 2, 102]], dtype=np.uint8)})
    setid = {"trnid": np.array([[4, 1]]), "valid": np.array([[2, 5]]), "tstid": np.array([[3, 6]])}
    savemat(tmp_path / "setid.mat", setid)
    train = ds.load_split("flowers102", tmp_path, "train")
    assert [(s.path.name, s.label) for s in train.samples] == [("image_00001.jpg", 0), ("image_00004.jpg", 0)]
    assert train.num_classes == 102 and train.crop_bottom == 0
    assert [s.label for s in ds.load_split("flowers102", tmp_path, "test").samples] == [101, 101]
    assert len(ds.load_split("flowers102", tmp_path, "trainval").samples) == 4
    with pytest.raises(DataError, match="splits are"):
        ds.load_split("flowers102", tmp_path, "everything")


def test_flowers102_missing_images_are_counted_in_one_line(tmp_path, photos):
    from scipy.io import savemat

    (tmp_path / "jpg").mkdir()
    for i in (1, 3):
        photos[i].save(tmp_path / "jpg" / f"image_{i:05d}.jpg")
    savemat(tmp_path / "imagelabels.mat", {"labels": np.arange(1, 8, dtype=np.uint8)[None]})
    setid = {"trnid": np.array([[3, 1]]), "valid": np.array([[2]]), "tstid": np.array([[7, 6, 5, 4]])}
    savemat(tmp_path / "setid.mat", setid)
    assert [s.label for s in ds.load_split("flowers102", tmp_path, "train").samples] == [0, 2]
    with pytest.raises(DataError) as info:
        ds.load_split("flowers102", tmp_path, "test")
    assert str(info.value) == (f"flowers102 test: 4 of 4 image files missing under {tmp_path / 'jpg'} "
                               "(image_00004.jpg, image_00005.jpg, image_00006.jpg, ...)")  # fmt: skip
    with pytest.raises(DataError, match=r"trainval: 1 of 3 image files missing .*\(image_00002.jpg\)$"):
        ds.load_split("flowers102", tmp_path, "trainval")


def test_fgvc_aircraft_missing_images_are_counted_in_one_line(tmp_path, photos):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nF/A-18\n")
    photos[0].save(data / "images" / "0000001.jpg")
    (data / "images_variant_test.txt").write_text("0000001 F/A-18\n0000002 707-320\n0000003 F/A-18\n")
    with pytest.raises(DataError) as info:
        ds.load_split("fgvc-aircraft", tmp_path, "test")
    assert str(info.value) == (f"fgvc-aircraft test (images_variant_test.txt): 2 of 3 image files missing "
                               f"under {data / 'images'} (0000002.jpg, 0000003.jpg)")  # fmt: skip


def test_fgvc_aircraft_official_layout_crops_banner(tmp_path, photos):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    variants = ["707-320", "Cessna 172", "F/A-18"]
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    ids = ["0034309", "1025794", "0056978"]
    for i, img in zip(ids, photos, strict=False):
        img.save(data / "images" / f"{i}.jpg")
    (data / "images_variant_trainval.txt").write_text(f"{ids[0]} F/A-18\n{ids[1]} Cessna 172\n")
    (data / "images_variant_test.txt").write_text(f"{ids[2]} 707-320\n")
    split = ds.load_split("fgvc-aircraft", tmp_path, "trainval")  # the archive's top folder is found
    assert [s.label for s in split.samples] == [2, 1] and split.num_classes == 3
    assert split.crop_bottom == ds.AIRCRAFT_BANNER_PX == 20
    img = ds.open_sample(split.samples[0], split.crop_bottom)
    assert img.size == (photos[0].width, photos[0].height - 20)
    assert ds.load_split("fgvc-aircraft", tmp_path, "test").samples[0].label == 0
    (data / "images_variant_val.txt").write_text(f"{ids[0]} Boeing 999\n")
    with pytest.raises(DataError, match="not in variants.txt"):
        ds.load_split("fgvc-aircraft", tmp_path, "val")


def test_imagenet100_restricts_to_the_cmc_classes(tmp_path, photos):
    classes = ds.imagenet100_classes()
    assert len(classes) == len(set(classes)) == 100 and classes == sorted(classes)
    assert "n02869837" in classes and "n01440764" not in classes  # CMC's first class in; tench out
    for split in ("train", "val"):
        for w in classes:
            (tmp_path / split / w).mkdir(parents=True)
        (tmp_path / split / "n01440764").mkdir()  # a class outside the 100: ignored
        photos[0].save(tmp_path / split / "n01440764" / "x.JPEG")
    photos[1].save(tmp_path / "train" / classes[5] / "a.JPEG")
    photos[2].save(tmp_path / "train" / classes[99] / "b.JPEG")
    train = ds.load_split("imagenet100", tmp_path, "train")
    assert [s.label for s in train.samples] == [5, 99] and train.num_classes == 100
    with pytest.raises(DataError, match="no images"):
        ds.load_split("imagenet100", tmp_path, "val")
    (tmp_path / "val" / classes[3]).rmdir()
    with pytest.raises(DataError, match="1 of the 100 class folders are missing"):
        ds.load_split("imagenet100", tmp_path, "val")


def test_imagefolder_and_labels_tsv(tmp_path, photos):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / "f" / split / c).mkdir(parents=True)
            photos[0].save(tmp_path / "f" / split / c / "1.jpg")
    tr = ds.load_split("imagefolder", tmp_path / "f", "train")
    assert tr.classes == ["cat", "dog"] and [s.label for s in tr.samples] == [0, 1]
    assert ds.load_split("imagefolder", tmp_path / "f", "val").root == tmp_path / "f" / "val"
    (tmp_path / "t").mkdir()
    photos[1].save(tmp_path / "t" / "a.jpg")
    (tmp_path / "t" / "labels.tsv").write_text("a.jpg\t7\n")
    tsv = ds.load_split("labels-tsv", tmp_path / "t", "train")  # no split folders: the root itself
    assert tsv.num_classes == 8 and tsv.samples[0].label == 7
    with pytest.raises(DataError, match="no labels.tsv"):
        ds.load_split("labels-tsv", tmp_path / "f", "train")


def test_download_offline_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(DataError, match="no network access.*copy it to"):
        ds.download_dataset("flowers102", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="image-net.org account"):
        ds.download_dataset("imagenet100", tmp_path)


def test_download_discards_a_file_with_the_wrong_checksum(tmp_path, monkeypatch):
    class Response(io.BytesIO):
        headers = {"Content-Length": "5"}

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: Response(b"wrong"))
    with pytest.raises(DataError, match="MD5 mismatch"):
        ds.download_dataset("flowers102", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_train_transform_is_a_function_of_the_seed(photos):
    tf = TrainTransform(32, randaug_n=2, randaug_m=9, reprob=1.0)
    state = torch.get_rng_state()
    a, b, c = tf(photos[0], 7), tf(photos[0], 7), tf(photos[0], 8)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_random_resized_crop_box_stays_inside():
    rng = random.Random(0)
    for w, h in [(500, 375), (10, 300), (64, 64)]:
        for _ in range(50):
            left, top, bw, bh = random_resized_crop_box(w, h, (0.08, 1.0), (3 / 4, 4 / 3), rng)
            assert 0 <= left and left + bw <= w and 0 <= top and top + bh <= h and bw > 0 and bh > 0


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0), (0.0, 0.0)])
def test_mixup_cutmix_targets(mixup, cutmix):
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    y = torch.tensor([0, 1, 2, 3])
    xm, t = mixup_cutmix(x, y, 5, np.random.default_rng(1), mixup, cutmix, smoothing=0.1)
    assert torch.allclose(t.sum(1), torch.ones(4))
    lam = (t[0, 0] - 0.1 / 5) / 0.9  # weight of sample 0's own label
    if mixup == cutmix == 0:
        assert torch.equal(xm, x) and torch.isclose(lam, torch.tensor(1.0))
    else:  # pixels are lam * own + (1 - lam) * reversed partner, on average
        assert torch.allclose(xm[0].mean(), lam * 0 + (1 - lam) * 3, atol=1e-5)


def test_the_shipped_flowers102_splits_load_as_the_official_ones(shared_assets):
    """The real files in ../shared/assets/flowers102: the official trnid/valid splits, 10 images of each of
    the 102 classes in each, disjoint; their images decode; the held-back test split fails in one line."""
    import hashlib
    from collections import Counter

    from renyiprune.data.images import DataError, load_image

    root = shared_assets / "flowers102"
    if not (root / "setid.mat").is_file():
        pytest.skip(f"Oxford Flowers-102 not found at {root}")
    # the official split files, as the assets README records them
    assert hashlib.sha256((root / "setid.mat").read_bytes()).hexdigest().startswith("46b8678f")
    assert hashlib.sha256((root / "imagelabels.mat").read_bytes()).hexdigest().startswith("4903e942")
    train, val = ds.load_split("flowers102", root, "train"), ds.load_split("flowers102", root, "val")
    for split in (train, val):
        counts = Counter(s.label for s in split.samples)
        assert len(split.samples) == 1020 and sorted(counts) == list(range(102))
        assert set(counts.values()) == {10}
    assert not {s.path for s in train.samples} & {s.path for s in val.samples}
    assert len(ds.load_split("flowers102", root, "trainval").samples) == 2040
    names = (root / "classes.txt").read_text().splitlines()
    assert len([n for n in names if n.strip()]) == 102
    for s in train.samples[:: 204]:
        assert min(load_image(s.path).size) == 224  # shorter side resized to 224 (assets README)
    with pytest.raises(DataError, match="6149 of 6149"):
        ds.load_split("flowers102", root, "test")
