"""renyiprune.data on real images: colour modes, the eval transform, listing, and unreadable files."""

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from renyiprune.data.images import (
    BadImageError,
    Batch,
    DataError,
    EvalTransform,
    ImageDataset,
    Sample,
    check_bad,
    check_labels,
    collate,
    list_samples,
    load_image,
    make_loader,
    to_rgb,
)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])

TENCH = "images/n01440764_tench.JPEG"  # 500x375 RGB: 256-resize gives 341x256, crop offset 58.5 -> 58
GRAY = "images/n02096051_Airedale.JPEG"  # 500x330 grayscale (mode L)
SMALL = "images/n03825788_nipple.JPEG"  # 106x150 RGB, portrait, upscaled by the transform


@pytest.fixture(scope="session")
def imagenet(shared_assets: Path) -> Path:
    root = shared_assets / "imagenet-sample-1000"
    if not (root / "labels.tsv").is_file():
        pytest.skip(f"../shared/assets/imagenet-sample-1000 not found at {root}")
    return root


@pytest.fixture(scope="session")
def photos(shared_assets: Path) -> Path:
    root = shared_assets / "photos"
    if not root.is_dir():
        pytest.skip(f"../shared/assets/photos not found at {root}")
    return root


def rgb_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int64)


def reopen(img: Image.Image, fmt: str, **kw) -> Image.Image:
    """Save ``img`` to bytes in ``fmt`` and open it again, so the test sees what PIL decodes from a file."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


# ------------------------------------------------------------------------------------------------ to_rgb


def test_rgb_passthrough(imagenet):
    img = load_image(imagenet / TENCH)
    assert img.mode == "RGB" and img.size == (500, 375)
    assert to_rgb(img) is img


def test_grayscale_jpeg(imagenet):
    with Image.open(imagenet / GRAY) as src:
        assert src.mode == "L"
        gray = np.asarray(src, dtype=np.int64)
        out = to_rgb(src)
    assert out.mode == "RGB"
    arr = np.asarray(out, dtype=np.int64)
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], gray)


def test_cmyk_jpeg(tmp_path, imagenet):
    rgb = Image.open(imagenet / TENCH).convert("RGB")
    path = tmp_path / "cmyk.jpg"
    rgb.convert("CMYK").save(path, "JPEG", quality=95)
    with Image.open(path) as img:
        assert img.mode == "CMYK"
        out = to_rgb(img)
    assert out.mode == "RGB" and out.size == rgb.size
    # Lossy JPEG round trip: close to the original colours, not inverted or garbled.
    diff = np.abs(rgb_array(out) - rgb_array(rgb))
    assert diff.mean() < 4, diff.mean()


def test_rgba_png_transparent_area_becomes_white(photos):
    rgb = Image.open(photos / "chelsea.png").convert("RGB")
    arr = np.asarray(rgb).copy()
    w = arr.shape[1]
    alpha = np.full(arr.shape[:2], 255, np.uint8)
    alpha[:, : w // 2] = 0  # left half fully transparent ...
    arr[:, : w // 2] = (10, 200, 30)  # ... over colour that must not leak through
    alpha[:20, w // 2 :] = 128  # a half-transparent strip
    img = reopen(Image.fromarray(np.dstack([arr, alpha]), "RGBA"), "PNG")
    assert img.mode == "RGBA"
    out = rgb_array(to_rgb(img))
    assert to_rgb(img).mode == "RGB"
    assert (out[:, : w // 2] == 255).all()
    np.testing.assert_array_equal(out[20:, w // 2 :], arr[20:, w // 2 :])
    expected = np.rint(arr[:20, w // 2 :].astype(np.float64) * 128 / 255 + 255 * 127 / 255)
    assert np.abs(out[:20, w // 2 :] - expected).max() <= 1


def test_palette_png_with_transparency(photos):
    pal = Image.open(photos / "coffee.png").convert("RGB").quantize(colors=16)
    idx = np.asarray(pal)
    transparent = int(np.bincount(idx.ravel()).argmax())  # the most common palette entry
    img = reopen(pal, "PNG", transparency=transparent)
    assert img.mode == "P" and "transparency" in img.info
    out = rgb_array(to_rgb(img))
    palette = np.array(pal.getpalette()[: 3 * 16]).reshape(16, 3)
    mask = idx == transparent
    assert mask.any() and (~mask).any()
    assert (out[mask] == 255).all()
    np.testing.assert_array_equal(out[~mask], palette[idx[~mask]])


def test_palette_png_without_transparency(photos):
    pal = Image.open(photos / "coffee.png").convert("RGB").quantize(colors=16)
    img = reopen(pal, "PNG")
    assert img.mode == "P" and "transparency" not in img.info
    np.testing.assert_array_equal(rgb_array(to_rgb(img)), rgb_array(pal))


def test_16bit_png_is_scaled_not_saturated(imagenet):
    gray8 = np.asarray(Image.open(imagenet / GRAY), dtype=np.uint16)
    img16 = Image.fromarray(gray8 * 257)  # the same picture at 16 bits: 255 -> 65535
    img = reopen(img16, "PNG")
    assert img.mode.startswith("I")  # "I;16" in recent Pillow
    assert np.asarray(img).max() > 255
    out = to_rgb(img)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out)[..., 1], gray8)


def test_16bit_mid_grey_maps_to_mid_grey():
    data = np.full((8, 8), 128 * 257, np.uint16)  # 32896: mid-grey at 16 bits
    img = reopen(Image.fromarray(data), "PNG")
    assert img.convert("L").getextrema() == (255, 255)  # what PIL's plain convert does
    assert to_rgb(img).getextrema() == ((128, 128),) * 3


@pytest.mark.parametrize(
    ("mode", "raw", "dtype"),
    [("I;16", 32896, "<u2"), ("I;16B", 32896, ">u2"), ("I", 32896, "<i4"), ("F", 0.5, "<f4")],
)
def test_high_bit_modes(mode, raw, dtype):
    data = np.full((4, 6), raw, dtype)
    data[0, 0] = 0
    img = Image.frombytes(mode, (6, 4), data.tobytes())
    arr = np.asarray(to_rgb(img))
    assert to_rgb(img).mode == "RGB"
    assert arr[0, 0].tolist() == [0, 0, 0]
    assert (arr.reshape(-1, 3)[1:] == 128).all()


def test_float_outside_unit_range_is_stretched():
    img = Image.fromarray(np.array([[-3.0, 1.0, 5.0]], np.float32), mode="F")
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 128, 255]


def test_16bit_pgm(tmp_path):
    path = tmp_path / "g.pgm"
    path.write_bytes(b"P5\n3 2\n65535\n" + np.array([0, 32896, 65535] * 2, ">u2").tobytes())
    out = load_image(path)
    assert out.mode == "RGB"
    assert np.asarray(out)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "YCbCr", "RGBX", "HSV"])
def test_other_modes(photos, mode):
    rgb = Image.open(photos / "astronaut.png").convert("RGB").resize((64, 64))
    img = rgb.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (64, 64)
    # Opaque images: same pixels as PIL's own conversion.
    np.testing.assert_array_equal(rgb_array(out), rgb_array(img))


# ---------------------------------------------------------------------------------------------- transform


def reference_transform(img: Image.Image, size: int = 224, crop_pct: float = 0.875) -> np.ndarray:
    """Independent resize-shorter-side / center-crop / normalise, in float64 numpy."""
    img = img.convert("RGB")
    w, h = img.size
    short = math.floor(size / crop_pct)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    a = np.asarray(img.resize((nw, nh), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    a = a[top : top + size, left : left + size]
    return ((a - MEAN) / STD).transpose(2, 0, 1)


@pytest.mark.parametrize("name", [TENCH, GRAY, SMALL])
def test_transform_matches_numpy(imagenet, name):
    img = Image.open(imagenet / name)
    x = EvalTransform()(img)
    assert isinstance(x, torch.Tensor)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and x.is_contiguous()
    np.testing.assert_allclose(x.numpy(), reference_transform(img), rtol=0, atol=1e-5)


def test_transform_resize_and_crop_geometry(imagenet):
    t = EvalTransform()
    assert t.resize_size == 256
    img = load_image(imagenet / TENCH)
    resized = t.resize(img)
    assert resized.size == (341, 256)
    # timm/torchvision offsets: top 32 / 2 = 16, left int(round(117 / 2)) = 58 (half to even), not 59.
    crop = t.center_crop(resized)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(resized)[16:240, 58 : 58 + 224])


def test_transform_other_size(photos):
    img = Image.open(photos / "chelsea.png")
    t = EvalTransform(input_size=160, crop_pct=1.0, interpolation="bilinear")
    x = t(img)
    assert x.shape == (3, 160, 160)
    resized = img.convert("RGB").resize((240, 160), Image.Resampling.BILINEAR)  # 451x300 -> 240x160
    a = np.asarray(resized, dtype=np.float64)[:, 40:200] / 255.0
    np.testing.assert_allclose(x.numpy(), ((a - MEAN) / STD).transpose(2, 0, 1), atol=1e-5)


def test_transform_rejects_bad_settings():
    with pytest.raises(ValueError, match="interpolation"):
        EvalTransform(interpolation="cubic")
    with pytest.raises(ValueError, match="crop_pct"):
        EvalTransform(crop_pct=0)


# ------------------------------------------------------------------------------------------------ listing


def test_list_real_labels_tsv(imagenet):
    samples = list_samples(imagenet)
    rows = [
        line.rstrip("\n").split("\t")
        for line in (imagenet / "labels.tsv").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(samples) == len(rows) == 1000
    assert [s.path for s in samples] == [imagenet / r[0] for r in rows]
    assert [s.label for s in samples] == [int(r[1]) for r in rows]
    assert samples[0] == Sample(imagenet / TENCH, 0)
    assert sorted(s.label for s in samples) == list(range(1000))


def make_tsv_folder(tmp_path: Path, imagenet: Path, rows: str) -> Path:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(imagenet / SMALL, tmp_path / name)
    (tmp_path / "labels.tsv").write_text(rows, encoding="utf-8")
    return tmp_path


def test_labels_tsv_order_comments_and_columns(tmp_path, imagenet):
    rows = "# file\tlabel\n\nc.jpg\t7\tn0\tseven\n   \na.jpg\t0\n# another comment\nb.jpg\t3\tn3\r\n"
    root = make_tsv_folder(tmp_path, imagenet, rows)
    samples = list_samples(str(root))  # str accepted too
    assert samples == [Sample(root / "c.jpg", 7), Sample(root / "a.jpg", 0), Sample(root / "b.jpg", 3)]
    assert all(isinstance(s.path, Path) for s in samples)


@pytest.mark.parametrize(
    ("bad_row", "words"),
    [
        ("b.jpg", "columns"),
        ("b.jpg\t1\tn\tname\textra", "columns"),
        ("b.jpg\tone", "integer"),
        ("b.jpg\t-1", "integer"),
        ("b.jpg\t1.5", "integer"),
        ("missing.jpg\t1", "1 of 3 image files missing under .* \\(missing.jpg\\)"),
        ("\t1", "empty file name"),
    ],
)
def test_labels_tsv_bad_row(tmp_path, imagenet, bad_row, words):
    root = make_tsv_folder(tmp_path, imagenet, f"# header\na.jpg\t0\n{bad_row}\nc.jpg\t2\n")
    with pytest.raises(DataError, match=words) as info:
        list_samples(root)
    assert "labels.tsv:3" in str(info.value)
    assert "\n" not in str(info.value)


def test_labels_tsv_missing_files_are_counted_in_one_line(tmp_path, imagenet):
    rows = "a.jpg\t0\ngone1.jpg\t1\nb.jpg\t1\nsub/gone2.jpg\t2\ngone3.jpg\t0\ngone4.jpg\t0\n"
    root = make_tsv_folder(tmp_path, imagenet, rows)
    with pytest.raises(DataError) as info:
        list_samples(root)
    message = str(info.value)
    assert message == (f"{root / 'labels.tsv'}:2: 4 of 6 image files missing under {root} "
                       "(gone1.jpg, sub/gone2.jpg, gone3.jpg, ...)")  # fmt: skip


BOM = "\ufeff"


def test_labels_tsv_with_a_byte_order_mark_and_a_data_row_first(tmp_path, imagenet):
    root = make_tsv_folder(tmp_path, imagenet, "")
    (root / "labels.tsv").write_bytes((BOM + "a.jpg\t5\nb.jpg\t6\n").encode("utf-8"))
    assert (root / "labels.tsv").read_bytes()[:3] == b"\xef\xbb\xbf"  # as spreadsheet tools save it
    assert list_samples(root) == [Sample(root / "a.jpg", 5), Sample(root / "b.jpg", 6)]


def test_labels_tsv_with_a_byte_order_mark_and_a_header_first(tmp_path, imagenet):
    root = make_tsv_folder(tmp_path, imagenet, "")
    text = BOM + "# file\tclass_index\twnid\tclass_name\r\nc.jpg\t2\tn0\ttwo\r\na.jpg\t0\r\n"
    (root / "labels.tsv").write_bytes(text.encode("utf-8"))
    assert list_samples(root) == [Sample(root / "c.jpg", 2), Sample(root / "a.jpg", 0)]


def test_check_labels_names_the_first_label_the_head_lacks(tmp_path):
    rows = [("a.jpg", 0), ("b.jpg", 2), ("c.jpg", 1), ("d.jpg", 7)]
    samples = [Sample(tmp_path / n, label) for n, label in rows]
    check_labels(samples, 8)  # nothing to say
    with pytest.raises(DataError) as info:
        check_labels(samples, 2)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'b.jpg'}: class index 2 is not below the model's head size 2")
    assert "\n" not in message


def test_labels_tsv_without_rows(tmp_path, imagenet):
    root = make_tsv_folder(tmp_path, imagenet, "# only a comment\n\n")
    with pytest.raises(DataError, match="no images found"):
        list_samples(root)


def test_image_folder(tmp_path, imagenet):
    for cls, names in {"zebra": ["b.JPEG", "a.png"], "ant": ["y.Jpg", "x.webp", "notes.txt"]}.items():
        (tmp_path / cls).mkdir()
        for name in names:
            shutil.copy(imagenet / SMALL, tmp_path / cls / name)
    (tmp_path / "ant" / "._x.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork: ignored
    (tmp_path / ".hidden").mkdir()  # hidden folder: not a class
    (tmp_path / "README.jpg").write_bytes(b"top-level files are not samples")
    samples = list_samples(tmp_path)
    expected = [("ant/x.webp", 0), ("ant/y.Jpg", 0), ("zebra/a.png", 1), ("zebra/b.JPEG", 1)]
    assert samples == [Sample(tmp_path / p, label) for p, label in expected]


def test_image_folder_keeps_empty_class_index(tmp_path, imagenet):
    (tmp_path / "a_empty").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(imagenet / SMALL, tmp_path / "b" / "img.jpg")
    assert list_samples(tmp_path) == [Sample(tmp_path / "b" / "img.jpg", 1)]


def test_listing_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_samples(tmp_path / "nope")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory"):
        list_samples(tmp_path / "file.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        list_samples(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images found"):
        list_samples(tmp_path / "empty")


# ------------------------------------------------------------------------------------- bad images, loader


@pytest.fixture
def folder_with_bad_images(tmp_path, imagenet) -> Path:
    """Two classes; class ``b`` holds a truncated JPEG, a text file named .jpg and a zero-byte .jpg."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(imagenet / TENCH, tmp_path / "a" / "1.jpg")
    shutil.copy(imagenet / GRAY, tmp_path / "a" / "2.jpg")
    shutil.copy(imagenet / SMALL, tmp_path / "b" / "1_good.jpg")
    data = (imagenet / TENCH).read_bytes()
    (tmp_path / "b" / "2_truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "b" / "3_text.jpg").write_text("this is not an image\n")
    (tmp_path / "b" / "4_empty.jpg").write_bytes(b"")
    shutil.copy(imagenet / TENCH, tmp_path / "b" / "5_good.jpg")
    return tmp_path


def test_truncated_jpeg_is_detected(folder_with_bad_images):
    path = folder_with_bad_images / "b" / "2_truncated.jpg"
    with Image.open(path) as img:  # the header alone reads fine ...
        assert img.size == (500, 375)
    with pytest.raises(OSError, match="truncated"):  # ... the pixels do not
        load_image(path)


def test_dataset_marks_bad_items(folder_with_bad_images):
    samples = list_samples(folder_with_bad_images)
    ds = ImageDataset(samples, EvalTransform())
    items = [ds[i] for i in range(len(ds))]
    assert [it.error is None for it in items] == [True, True, True, False, False, False, True]
    assert "truncated" in items[3].error
    assert all(it.image.shape == (0, 3, 224, 224) for it in items[3:6])
    assert [it.label for it in items] == [0, 0, 1, 1, 1, 1, 1]
    assert [it.index for it in items] == list(range(7))

    batch = collate(items[3:6])
    assert batch.images.shape == (0, 3, 224, 224)
    assert batch.labels.shape == batch.indices.shape == (0,)
    assert [p for p, _ in batch.bad] == [str(s.path) for s in samples[3:6]]


def test_loader_with_workers_reports_bad_images(folder_with_bad_images):
    loader, samples = make_loader(folder_with_bad_images, EvalTransform(), batch_size=4, workers=2)
    assert len(samples) == 7 and loader.num_workers == 2
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    assert [b.images.shape[0] for b in batches] == [3, 1]
    first, second = batches

    assert first.indices.tolist() == [0, 1, 2] and first.labels.tolist() == [0, 0, 1]
    assert first.labels.dtype == torch.int64 and first.indices.dtype == torch.int64
    truncated = str(folder_with_bad_images / "b" / "2_truncated.jpg")
    assert first.bad == [(truncated, first.bad[0][1])] and "truncated" in first.bad[0][1]
    assert [p for p, _ in second.bad] == [str(samples[4].path), str(samples[5].path)]
    assert second.indices.tolist() == [6] and second.labels.tolist() == [1]

    # The good images are exactly what the transform gives in the main process.
    t = EvalTransform()
    torch.testing.assert_close(first.images[1], t(Image.open(samples[1].path)), rtol=0, atol=0)

    with pytest.raises(BadImageError, match="2_truncated.jpg") as info:
        check_bad(first, skip_bad=False)
    assert info.value.path == truncated and "truncated" in str(info.value)
    assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)
    with pytest.raises(BadImageError, match=r"3_text\.jpg.*\(and 1 more in this batch\)"):
        check_bad(second, skip_bad=False)
    assert check_bad(first, skip_bad=True) == 1
    assert check_bad(second, skip_bad=True) == 2


def test_check_bad_clean_batch(folder_with_bad_images):
    ds = ImageDataset(list_samples(folder_with_bad_images)[:2], EvalTransform())
    batch = collate([ds[0], ds[1]])
    assert check_bad(batch, skip_bad=False) == 0
    assert check_bad(batch, skip_bad=True) == 0


def test_make_loader_limit_on_real_labels(imagenet):
    t = EvalTransform(input_size=32, crop_pct=1.0)  # small output keeps this fast
    loader, samples = make_loader(imagenet, t, batch_size=4, limit=6)
    assert samples == list_samples(imagenet)[:6]
    batches = list(loader)
    assert [b.images.shape for b in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert torch.cat([b.labels for b in batches]).tolist() == [s.label for s in samples]
    assert torch.cat([b.indices for b in batches]).tolist() == list(range(6))
    assert all(b.bad == [] for b in batches)
    with pytest.raises(DataError, match="limit"):
        make_loader(imagenet, t, limit=0)
