"""``renyiprune visualize``: what the figures draw, the files it writes, and index.html in a browser."""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import renyiprune as rp
from renyiprune.cli import main
from renyiprune.core.api import share_parameters
from renyiprune.core.entropy import renyi_entropy
from renyiprune.data.images import EvalTransform, load_image
from renyiprune.viz import inspect_attention as ia
from renyiprune.viz import plots

pytest.importorskip("matplotlib")

GRID, PATCH = (14, 14), 16


# ---------------------------------------------------------------------------------------------
# Attention distance (synthetic, no assets needed)


def _brute_mean_distance(grid: tuple[int, int], patch: int) -> float:
    cells = list(itertools.product(range(grid[0]), range(grid[1])))
    total = sum(math.dist(p, q) for p in cells for q in cells)
    return patch * total / len(cells) ** 2


def test_attention_distance_self_only_is_zero():
    n = GRID[0] * GRID[1]
    logits = torch.full((2, 3, n + 1, n + 1), -math.inf)
    logits[:, :, torch.arange(n + 1), torch.arange(n + 1)] = 0.0  # every token attends only to itself
    assert torch.equal(ia.attention_distance(logits, GRID, PATCH), torch.zeros(2, 3))


@pytest.mark.parametrize("grid", [(14, 14), (3, 3), (2, 5)])
def test_attention_distance_uniform_is_grid_mean(grid):
    n = grid[0] * grid[1]
    logits = torch.zeros(1, 2, n + 1, n + 1)
    logits[..., 0] = 5.0  # a CLS key soaking up attention does not count: it has no position
    got = ia.attention_distance(logits, grid, PATCH)
    assert torch.allclose(got, torch.full((1, 2), _brute_mean_distance(grid, PATCH)), rtol=1e-6)


def test_attention_distance_by_hand():
    # 1x2 grid, uniform: each query spends half its attention 16 px away -> 8 px.
    assert ia.attention_distance(torch.zeros(1, 1, 3, 3), (1, 2), PATCH).item() == pytest.approx(8.0)
    # 2x2 grid, uniform: distances 0, 16, 16, 16·√2 from every query.
    want = (0 + 16 + 16 + 16 * math.sqrt(2)) / 4
    assert ia.attention_distance(torch.zeros(1, 1, 5, 5), (2, 2), PATCH).item() == pytest.approx(want)


# ---------------------------------------------------------------------------------------------
# Real model on a real photo


@pytest.fixture(scope="module")
def model(shared_assets):
    return rp.create_model(
        "deit_tiny_patch16_224", weights=shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"
    )


@pytest.fixture(scope="module")
def chelsea(shared_assets):
    img = load_image(shared_assets / "photos" / "chelsea.png")
    tf = EvalTransform()
    return tf(img).unsqueeze(0), np.asarray(tf.center_crop(tf.resize(img)))


def _logits_by_hand(model, x: torch.Tensor, block: int) -> torch.Tensor:
    """Walk the blocks without hooks and return block ``block``'s logits from its own qkv_heads + scale."""
    t = model.patch_embed(x)
    t = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + model.pos_embed
    for i, blk in enumerate(model.blocks):
        if i == block:
            q, k, _ = blk.attn.qkv_heads(blk.norm1(t))
            return (q * blk.attn.scale) @ k.transpose(-2, -1)
        t = blk(t)
    raise AssertionError("block out of range")


def _drawn(fig, gid: str) -> np.ndarray:
    found = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, gid
    return np.asarray(found[0].get_array())


@torch.inference_mode()
def test_entropy_map_draws_renyi_entropy_of_block_logits(model, chelsea):
    x, crop = chelsea
    logits = ia.block_logits(model, x)
    assert len(logits) == 12 and logits[0].shape == (1, 3, 197, 197)
    assert not any(blk.attn._forward_pre_hooks for blk in model.blocks)  # hooks removed
    alphas, blocks = [1.0, 2.0, math.inf], [0, 5, 11]
    maps = ia.entropy_maps(logits, alphas, blocks, GRID)
    fig = plots.entropy_maps_figure(crop, {a: m.numpy() for a, m in maps.items()}, blocks, "test")
    by_hand = {b: _logits_by_hand(model, x, b) for b in blocks}
    for a, b in itertools.product(alphas, blocks):
        expected = renyi_entropy(by_hand[b][0, :, 1:, :], a).mean(dim=0).reshape(GRID)
        drawn = _drawn(fig, f"entropy a={plots.alpha_label(a)} block={b}")
        np.testing.assert_allclose(drawn, expected.numpy(), rtol=1e-4, atol=1e-5)


@torch.inference_mode()
@pytest.mark.parametrize("fuse", [False, True])
def test_mask_greys_exactly_the_pruned_patches(model, chelsea, fuse):
    x, crop = chelsea
    locs, keep = (3, 6, 9), 0.7
    specs = [ia.MaskSpec("renyi a=2", "renyi", 2.0), ia.MaskSpec("evit", "evit")]
    rows, kept_all = [], []
    for spec in specs:
        kept, fused = ia.pruning_masks(model, x, spec, keep, locs, fuse)
        rows.append((spec.label, kept[0].numpy(), fused[0].tolist()))
        kept_all.append(kept[0])
    fig = plots.masks_figure(crop, rows, locs, GRID, "test")
    counts = ia.kept_counts(196, keep, len(locs), fuse)
    assert counts == ([138, 98, 70] if fuse else [138, 97, 68])  # fused: ceil(0.7 * 139), ceil(0.7 * 99)
    for (label, kept, fused), _ in zip(rows, specs, strict=True):
        for s in range(len(locs)):
            overlay = _drawn(fig, f"mask {label} stage={s}")
            assert overlay.shape == (*GRID, 4)
            greyed = int((overlay[..., 3] > 0).sum())
            # EViT's fusion ranks the fused token(s) of earlier stages with the patches: each one kept
            # is a patch fewer
            assert 196 - counts[s] <= greyed <= 196 - counts[s] + (s if fuse else 0)
            assert np.array_equal(overlay[..., 3] == 0, kept[s].reshape(GRID))
            assert fused[s] == (greyed if fuse else 0)
    # The mask rows are what the patched model's records say survived.
    view = rp.patch(share_parameters(model), keep_rate=keep, criterion="evit", locations=locs, fuse=fuse)
    view(x)
    for s, rec in enumerate(view.renyiprune.records):
        patches = {i for i in rec.patch_index[0].tolist() if i >= 0}  # -1: a kept fused token
        assert patches == set(np.flatnonzero(kept_all[1][s].numpy()).tolist())


@torch.inference_mode()
def test_random_masks_and_saved_figures_are_deterministic(model, chelsea, tmp_path):
    x, crop = chelsea
    spec = ia.MaskSpec("random", "random", options=(("seed", 3),))
    a = ia.pruning_masks(model, x, spec, 0.5, (3,), False)[0]
    b = ia.pruning_masks(model, x, spec, 0.5, (3,), False)[0]
    assert torch.equal(a, b)
    for fmt in ("png", "svg"):
        data = []
        for i in range(2):
            fig = plots.masks_figure(crop, [("random", a[0].numpy(), [0])], (3,), GRID, "determinism")
            plots.save_figure(fig, tmp_path / f"{i}.{fmt}", seed=1)
            data.append((tmp_path / f"{i}.{fmt}").read_bytes())
        assert data[0] == data[1], fmt


# ---------------------------------------------------------------------------------------------
# The command


def _cli(*args: str) -> tuple[int, str]:
    """Run the command in this process (no second torch import); returns (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def rendered(shared_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("viz") / "out"
    weights = shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"
    rc, err = _cli(
        "visualize", "--weights", str(weights), str(shared_assets / "photos" / "chelsea.png"),
        "--alpha", "1,inf", "--blocks", "3,9", "--keep", "0.7", "--criterion", "renyi,evit,random",
        "--fuse", "--out", str(out), "--format", "png,svg", "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    return out


# Pixel sizes of this configuration's figures (inches of plots.py's fixed layout × 100 dpi).
EXPECTED_PX = {
    "000_chelsea_entropy": (491, 485),  # 2 blocks × 2 α
    "000_chelsea_masks": (755, 935),  # input + 3 stages × 4 criteria (renyi α=1, α=∞, evit, random)
    "histograms": (915, 585),  # 3 stages × 2 α
    "distance": (880, 395),  # 2 α panels
}


def _is_blank(path: Path) -> bool:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    colours = np.unique((arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2])
    return arr.std() < 5 or len(colours) < 50


def test_cli_writes_every_figure_with_its_size(rendered):
    names = sorted(p.name for p in rendered.iterdir())
    expected = {f"{stem}.{fmt}" for stem in EXPECTED_PX for fmt in ("png", "svg")}
    assert expected | {"index.html", "figures.json"} == set(names)
    for stem, size in EXPECTED_PX.items():
        png = rendered / f"{stem}.png"
        assert Image.open(png).size == size, stem
        assert not _is_blank(png), stem
        svg = (rendered / f"{stem}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    assert not [p for p in rendered.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_locations_are_0_based_in_figures_json_and_named_both_ways_in_captions(rendered):
    """--locations counts from 0: figures.json carries those indices, the captions say "block 4 (index 3)"."""
    import json

    manifest = json.loads((rendered / "figures.json").read_text())
    assert manifest["locations"] == [3, 6, 9] and manifest["blocks"] == [3, 9]  # the defaults, --blocks 3,9
    assert sorted(manifest["files"]) == sorted(f"{s}.{f}" for s in EXPECTED_PX for f in ("png", "svg"))
    page = (rendered / "index.html").read_text()
    assert "blocks 4, 7, 10 (indices 3, 6, 9)" in page and "1-based" not in page
    fig = plots.histograms_figure({1.0: [(np.arange(4.0), np.array([1, 1, 0, 0], bool))]}, (3,), "t")
    assert fig.axes[0].get_title().startswith("α = 1, block 4 (index 3)")
    fig = plots.masks_figure(np.zeros((224, 224, 3), np.uint8), [("evit", np.ones((1, 196), bool), [0])],
                             (3,), GRID, "t")  # fmt: skip
    assert fig.axes[1].get_title().startswith("after block 4 (index 3)")


def test_a_second_run_into_the_same_folder_leaves_none_of_the_first_runs_figures(
    rendered, shared_assets, tmp_path
):
    """Rerun into --out: the first run's figures that the second does not draw (another image, svg) are
    removed; a file visualize did not write stays."""
    out = tmp_path / "out"
    shutil.copytree(rendered, out)
    (out / "notes.txt").write_text("mine")
    weights = shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"
    rc, err = _cli(
        "visualize", "--weights", str(weights), str(shared_assets / "photos" / "coffee.png"), "--alpha", "2",
        "--criterion", "evit", "--locations", "3,6", "--blocks", "3", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    stems = ["000_coffee_entropy", "000_coffee_masks", "histograms", "distance"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"{s}.png" for s in stems), "figures.json", "index.html", "notes.txt"]
    )
    assert (out / "notes.txt").read_text() == "mine"


def test_index_html_is_offline_and_lists_every_figure(rendered):
    page = (rendered / "index.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    shown = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(shown) == sorted(f"{stem}.png" for stem in EXPECTED_PX)
    assert page.count("<figcaption>") == len(EXPECTED_PX)
    assert "keep rate" in page and "deit_tiny_patch16_224" in page


@pytest.mark.parametrize(
    "extra, message",
    [
        (["missing.png"], "image not found"),
        (["--alpha", "1,-2", "PHOTO"], "alpha"),
        (["--keep", "0", "PHOTO"], "--keep"),
        (["--keep", "1.5", "PHOTO"], "--keep"),
        (["CORRUPT"], "cannot read image"),
    ],
)
def test_bad_inputs_exit_nonzero_with_one_line_and_no_output(shared_assets, tmp_path, extra, message):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    photo = str(shared_assets / "photos" / "chelsea.png")
    extra = [photo if e == "PHOTO" else str(corrupt) if e == "CORRUPT" else e for e in extra]
    out = tmp_path / "out"
    weights = shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"
    rc, err = _cli("visualize", "--weights", str(weights), "--out", str(out), "--no-progress", *extra)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("renyiprune visualize: error:") and message in lines[0], err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.png"]


# ---------------------------------------------------------------------------------------------
# index.html in headless Chromium

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Appended to a copy of index.html: marks every image as loaded or broken once the page has loaded.
MARK_IMAGES = """<script>
window.addEventListener("load", function () {
  for (const img of document.images) {
    img.setAttribute("data-state", img.complete && img.naturalWidth > 0 ? "ok" : "broken");
  }
  document.body.setAttribute("data-checked", String(document.images.length));
});
</script>"""


def _chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([apt, "update"], [apt, "install", "-y", "--no-install-recommends", "chromium"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        except subprocess.TimeoutExpired:
            pytest.skip(f"installing chromium timed out: {' '.join(cmd)}")
        if r.returncode != 0:
            tail = " ".join(r.stderr.strip().splitlines()[-1:])
            pytest.skip(f"cannot install chromium ({' '.join(cmd[1:2])} failed: {tail})")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed no chromium binary")
    return found


def test_index_html_shows_every_image_in_headless_chromium(rendered):
    chromium = _chromium()
    page = (rendered / "index.html").read_text()
    check = rendered / "_check.html"
    check.write_text(page.replace("</body>", MARK_IMAGES + "</body>"))
    try:
        with tempfile.TemporaryDirectory() as profile:
            r = subprocess.run(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                 "--dump-dom", check.as_uri()],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
    finally:
        check.unlink()
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    n = len(EXPECTED_PX)
    assert f'data-checked="{n}"' in dom, dom[-2000:]
    assert dom.count('data-state="ok"') == n
    assert 'data-state="broken"' not in dom


def test_out_that_is_a_file_is_refused(shared_assets, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder")
    photo = str(shared_assets / "photos" / "chelsea.png")
    weights = str(shared_assets / "weights" / "deit_tiny_patch16_224.safetensors")
    rc, err = _cli("visualize", "--weights", weights, "--out", str(out), "--no-progress", photo)
    assert rc == 2 and "is not a folder" in err
    assert out.read_text() == "not a folder"
