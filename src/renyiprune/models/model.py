"""A plain Vision Transformer (ViT / DeiT) with timm-compatible parameter names.

timm cannot be imported on our machines, so this is our own small copy of its structure:
``PatchEmbed`` -> CLS token + absolute position embedding -> ``Block`` x depth -> ``norm`` -> ``head``.
Parameter names match timm's ``VisionTransformer`` so checkpoints load unchanged. Nothing here
knows about pruning; ``renyiprune.patch`` swaps the classes of a few blocks in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "Block",
    "Mlp",
    "PatchEmbed",
    "VisionTransformer",
    "ViTConfig",
    "ModelSpec",
    "MODELS",
    "register_model",
    "list_models",
    "create_model",
    "weights_id",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PatchEmbed(nn.Module):
    """Image to a sequence of patch embeddings with one strided convolution."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class Attention(nn.Module):
    """Multi-head self-attention; the forward uses fused ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project x (B, N, C) to q, k, v, each (B, heads, N, head_dim)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def merge_heads(self, out: Tensor) -> Tensor:
        """(B, heads, N, head_dim) -> projected (B, N, C)."""
        B, H, N, D = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, N, H * D))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv_heads(x)
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v))


class Mlp(nn.Module):
    """Two-layer MLP with GELU (timm names ``fc1`` / ``fc2``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at inference)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


@dataclass(frozen=True)
class ViTConfig:
    """A VisionTransformer's shape and regularisation (timm's constructor arguments and defaults)."""

    # input and output
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    # width and depth
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    # details
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0


class VisionTransformer(nn.Module):
    """ViT with a CLS token and learned absolute position embeddings (DeiT / original ViT)."""

    def __init__(self, config: ViTConfig | None = None, **overrides):
        """``config`` (default ``ViTConfig()``) with ``overrides`` of its fields replaced, so that
        ``VisionTransformer(depth=4)`` still works."""
        super().__init__()
        c = replace(config or ViTConfig(), **overrides)
        self.num_classes = c.num_classes
        self.embed_dim = c.embed_dim
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, c.embed_dim))
        rates = torch.linspace(0, c.drop_path_rate, c.depth).tolist()
        self.blocks = nn.Sequential(
            *(Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias, c.norm_eps, r) for r in rates)
        )
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        self.head = nn.Linear(c.embed_dim, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` classes."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x[:, 0])

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# Registry of named variants


@dataclass(frozen=True)
class ModelSpec:
    """A named variant: constructor arguments, preprocessing and where its official weights live."""

    name: str
    kwargs: dict = field(default_factory=dict)
    url: str | None = None
    # SHA-256 of the official file; a prefix (as in torch.hub file names) where that is what is published.
    sha256: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    img_size: int = 224


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a named variant to the registry (one line per model)."""
    MODELS[spec.name] = spec
    return spec


_DEIT = "https://dl.fbaipublicfiles.com/deit/"
# DeiT (Touvron et al. 2021): name, width, heads, and the hash prefix the published file name carries.
for _name, _dim, _heads, _sha in (
    ("deit_tiny_patch16_224", 192, 3, "a1311bcf"),
    ("deit_small_patch16_224", 384, 6, "cd65a155"),
    ("deit_base_patch16_224", 768, 12, "b5f2ef4d"),
):
    register_model(
        ModelSpec(
            _name,
            dict(patch_size=16, embed_dim=_dim, depth=12, num_heads=_heads),
            url=f"{_DEIT}{_name}-{_sha}.pth",
            sha256=_sha,
        )
    )

register_model(
    ModelSpec(
        "vit_base_patch16_224",
        dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
        url="https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/"
        "jx_vit_base_p16_224-80ecf9dd.pth",
        sha256="80ecf9dd",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        crop_pct=0.9,
    )
)


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; ValueError listing the known names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return MODELS[name]


def weights_id(name: str, weights: str | Path | None) -> str:
    """What identifies the weights ``name`` runs with in a result cache's key: the SHA-256 of the file's
    bytes (never its name: two runs both write model.safetensors), or the official file's URL and digest."""
    from .weights import sha256_file

    if weights is not None:
        return sha256_file(weights)
    spec = get_spec(name)
    return f"{spec.url}#{spec.sha256}"


def _adapt_checkpoint(model: VisionTransformer) -> Callable[[dict, nn.Module], dict]:
    """State-dict adapter: interpolate pos_embed to the model's grid (other image sizes)."""
    from .weights import resample_pos_embed

    def adapt(sd: dict, _m: nn.Module) -> dict:
        pe = sd.get("pos_embed")
        want = model.pos_embed.shape
        if pe is not None and pe.ndim == 3 and pe.shape != want and pe.shape[-1] == want[-1]:
            old = pe.shape[1] - model.num_prefix_tokens
            if math.isqrt(old) ** 2 == old:  # a square grid we know how to resample
                sd = dict(sd, pos_embed=resample_pos_embed(pe, model.patch_embed.grid_size))
        return sd

    return adapt


def create_model(
    name: str,
    weights: str | Path | dict | None = None,
    num_classes: int | None = None,
    pretrained: bool = False,
    **kwargs,
) -> VisionTransformer:
    """Build a registered variant, optionally loading weights.

    ``weights``: a ``.safetensors`` / ``.pth`` path (official DeiT ``{"model": ...}`` or a plain state
    dict) or a state dict. ``pretrained=True`` downloads the official file into the cache instead.
    ``num_classes`` other than the checkpoint's keeps its backbone and starts a fresh head.
    ``img_size=384`` (etc.) interpolates the position embedding. Keys and shapes are checked strictly.
    """
    from .weights import download, load_state_dict_strict, read_state_dict

    spec = get_spec(name)
    ctor = dict(spec.kwargs, img_size=spec.img_size)
    ctor.update(kwargs)
    if num_classes is not None:
        ctor["num_classes"] = num_classes
    model = VisionTransformer(**ctor)
    model.pretrained_cfg = replace(spec, img_size=ctor["img_size"])
    if weights is None and pretrained:
        if spec.url is None:
            raise ValueError(f"model {name!r} has no official download; pass weights=PATH")
        weights = download(spec.url, spec.sha256)
    if weights is not None:
        sd = weights if isinstance(weights, dict) else read_state_dict(weights)
        drop = ()
        head_w = sd.get("head.weight")
        if head_w is not None and head_w.shape[0] != model.num_classes:
            if num_classes is None:
                raise ValueError(
                    f"checkpoint has a {head_w.shape[0]}-class head but the model has {model.num_classes}; "
                    "pass num_classes to replace the head"
                )
            drop = ("head.",)
        load_state_dict_strict(model, sd, adapt=_adapt_checkpoint(model), drop_prefixes=drop)
    return model.eval()
