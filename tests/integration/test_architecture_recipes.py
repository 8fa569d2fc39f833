"""The two recipes of docs/architecture.md, run from the page itself, do what they say: a new criterion prunes
the real DeiT-Tiny by its own scores, and a new host model prunes as a hand-written forward does."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import renyiprune as rp
from renyiprune.core.criteria import CRITERIA
from renyiprune.core.hosts import HOSTS
from renyiprune.data.images import EvalTransform, load_image

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
DEMO_IMAGES = sorted((REPO / "demo" / "imagenet-100" / "images").glob("*.JPEG"))[:4]


def recipe(title: str) -> str:
    """The python blocks of the docs/architecture.md section ``title``, joined in order."""
    text = DOC.read_text(encoding="utf-8")
    assert f"\n## {title}\n" in text, f"docs/architecture.md has no section {title!r}"
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```", section, flags=re.S | re.M)
    assert blocks, f"section {title!r} has no python block"
    return "\n".join(blocks)


@pytest.fixture
def run_recipe(monkeypatch):
    """Run a section's code from the repository root; the registries it extends are restored after."""
    criteria, hosts = dict(CRITERIA), list(HOSTS)
    monkeypatch.chdir(REPO)

    def run(title: str, namespace: dict | None = None) -> dict:
        ns = {"__name__": "recipe", **(namespace or {})}
        exec(compile(recipe(title), f"docs/architecture.md: {title}", "exec"), ns)
        return ns

    yield run
    CRITERIA.clear()
    CRITERIA.update(criteria)
    HOSTS[:] = hosts


def _real_images() -> torch.Tensor:
    transform = EvalTransform(224)
    return torch.stack([transform(load_image(p)) for p in DEMO_IMAGES])


def test_the_criterion_recipe_keeps_the_patches_with_the_longest_keys(run_recipe):
    ns = run_recipe("How to add a criterion")
    assert CRITERIA["key_norm"] is ns["key_norm"] and "key_norm" in rp.list_criteria()
    model, images = ns["model"], _real_images()
    with torch.no_grad():
        logits = model(images)
        (record,) = rp.records(model)
        # By hand: the unpruned blocks 0-2, then block 3's keys from its qkv weights, l1 norm, head mean.
        x = model.patch_embed(images)
        x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], dim=1) + model.pos_embed
        for block in model.blocks[:3]:
            x = block(x)
        block = model.blocks[3]
        B, N, C = x.shape
        heads = block.attn.num_heads
        keys = torch.nn.functional.linear(block.norm1(x), block.attn.qkv.weight, block.attn.qkv.bias)
        keys = keys.view(B, N, 3, heads, C // heads)[:, 1:, 1]  # the patches' keys (B, n, heads, d)
        scores = keys.abs().sum(dim=-1).mean(dim=-1)
    k = math.ceil(0.5 * 196)
    assert record.location == 3 and record.kept.shape == (len(DEMO_IMAGES), k)
    torch.testing.assert_close(record.scores, scores, rtol=1e-5, atol=1e-5)
    top = scores.sort(dim=1, descending=True).values
    assert (top[:, k - 1] - top[:, k]).min() > 1e-4, "the kept set is decided by more than rounding"
    assert torch.equal(record.kept.sort(dim=1).values, scores.topk(k, dim=1).indices.sort(dim=1).values)
    assert torch.equal(record.patch_index, record.kept)  # the first location: candidates are the patches
    assert logits.shape == (len(DEMO_IMAGES), 1000)


def _reference(host, images: torch.Tensor, locations: tuple[int, ...], keep: float):
    """TinyViT's forward written out, keeping at ``locations`` the ceil(keep * n) patches with the most
    head-mean CLS attention (EViT) after the attention residual: (logits, kept per location)."""
    x = host.to_patches(images).flatten(2).transpose(1, 2)
    x = torch.cat([host.cls.expand(len(x), -1, -1), x], dim=1) + host.pos
    kept_all = []
    for i, layer in enumerate(host.layers):
        B, N, C = x.shape
        qkv = layer.to_qkv(layer.ln_a(x)).view(B, N, 3, layer.heads, C // layer.heads)
        q, k, v = qkv.unbind(2)  # (B, N, heads, d)
        attn = torch.einsum("bnhd,bmhd->bhnm", q, k).mul(layer.head_dim**-0.5).softmax(dim=-1)
        x = x + layer.to_out(torch.einsum("bhnm,bmhd->bnhd", attn, v).reshape(B, N, C))
        if i in locations:
            cls_attn = attn[:, :, 0, 1:].mean(dim=1)
            kept = cls_attn.topk(math.ceil(keep * (N - 1)), dim=1).indices.sort(dim=1).values
            kept_all.append(kept)
            x = torch.cat([x[:, :1], x[:, 1:].gather(1, kept[..., None].expand(-1, -1, C))], dim=1)
        x = x + layer.ffn(layer.ln_b(x))
    return host.classify(host.ln(x)[:, 0]), kept_all


def test_the_host_recipe_prunes_a_foreign_vit_as_a_hand_written_forward_does(run_recipe):
    ns = run_recipe("How to add a host model", {"torch": torch, "rp": rp})
    TinyViT, Layer, host = ns["TinyViT"], ns["Layer"], ns["host"]
    assert "tiny_vit" in [h.name for h in HOSTS]
    assert type(host) is TinyViT and all(type(layer) is Layer for layer in host.layers)  # unpatched
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unpruned = host(images)
        want, want_kept = _reference(host, images, (1, 2), 0.5)
        rp.prune(host, rp.PrunePlan.uniform(keep_rate=0.5, criterion="evit", locations=(1, 2)))
        got = host(images)
    assert [r.location for r in rp.records(host)] == [1, 2]
    for record, kept in zip(rp.records(host), want_kept, strict=True):
        assert torch.equal(record.kept.sort(dim=1).values, kept)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unpruned, atol=1e-3)  # pruning changed the output
    first = rp.records(host)[0].patch_index
    assert first.shape == (3, 8) and int(first.max()) < 16
    rp.unpatch(host)
    with torch.no_grad():
        assert torch.equal(host(images), unpruned)
