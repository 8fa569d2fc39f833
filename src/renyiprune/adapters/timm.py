"""timm ``VisionTransformer``: the block interface renyiprune's pruning uses, on timm's own modules.

timm's Block already has norm1/attn/drop_path1/norm2/mlp/drop_path2; what it lacks is ``attn.qkv_heads``
/ ``attn.merge_heads`` (timm runs fused attention inside ``Attention.forward``) and the LayerScale
(``ls1``/``ls2``) in our residual branches. The adapter adds both by re-classing the blocks at the
pruning locations; weights stay timm's. timm is detected by structure, so it is never imported here.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from . import HostView, UnsupportedModelError, check_token_layout, patch_with_adapter

__all__ = ["handles", "patch"]


def handles(model: nn.Module) -> bool:
    """A timm-style ViT: ``blocks`` whose attention has a fused ``qkv`` but not our ``qkv_heads``."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks):
        return False
    attn = getattr(blocks[0], "_modules", {}).get("attn")  # the module itself, also once adapted
    return hasattr(attn, "qkv") and not hasattr(attn, "qkv_heads")


class _Attention:
    """qkv_heads / scale / merge_heads on a timm ``Attention`` (with its optional q/k norms)."""

    def __init__(self, att: nn.Module):
        self.att = att
        self.scale = att.scale

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.att
        B, N, C = x.shape
        qkv = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q_norm, k_norm = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
        return (q_norm(q) if q_norm else q), (k_norm(k) if k_norm else k), v

    def merge_heads(self, out: Tensor) -> Tensor:
        a = self.att
        B, H, N, D = out.shape
        x = out.transpose(1, 2).reshape(B, N, H * D)
        norm = getattr(a, "norm", None)  # timm >= 1.0.9: optional norm before the projection
        x = norm(x) if norm is not None else x
        x = a.proj(x)
        drop = getattr(a, "proj_drop", None)
        return drop(x) if drop is not None else x


class _Block:
    """Mixin before timm's Block: our attention interface, LayerScale folded into the residual branches."""

    attn = property(lambda self: _Attention(self._modules["attn"]))

    @property
    def drop_path1(self):
        dp, ls = self._modules["drop_path1"], self._modules.get("ls1")
        return dp if ls is None else (lambda y: dp(ls(y)))

    @property
    def drop_path2(self):
        dp, ls = self._modules["drop_path2"], self._modules.get("ls2")
        return dp if ls is None else (lambda y: dp(ls(y)))

    def __call__(self, x: Tensor, *args, **kwargs):
        if any(a is not None for a in args) or any(v is not None for v in kwargs.values()):
            raise UnsupportedModelError("renyiprune's pruning blocks do not take an attention mask")
        return nn.Module.__call__(self, x)


def _check(model: nn.Module) -> list:
    name = type(model).__name__
    check_token_layout(model, max_prefix=1)  # register / distillation tokens: not verified against timm yet
    blocks = list(model.blocks)
    for i, b in enumerate(blocks):
        att = getattr(b, "attn", None)
        need = [a for a in ("norm1", "norm2", "mlp", "drop_path1", "drop_path2") if not hasattr(b, a)]
        need += [
            f"attn.{a}" for a in ("qkv", "num_heads", "head_dim", "scale", "proj") if not hasattr(att, a)
        ]
        if need:
            raise UnsupportedModelError(
                f"renyiprune.patch cannot prune block {i} ({type(b).__name__}) of {name}: it has no "
                f"{', '.join(need)}"
            )
    return blocks


def patch(model: nn.Module, core_patch: Callable[..., object], **kwargs) -> nn.Module:
    """``renyiprune.patch`` for a timm VisionTransformer: adapt the blocks, keep timm's own forward."""
    from ..patch import _PrunedModel, unpatch

    blocks = _check(unpatch(model))

    def adapt() -> tuple[HostView, dict[int, type]]:
        originals = {}
        for b in blocks:
            originals[id(b)] = b.__class__
            b.__class__ = type(b.__class__.__name__, (_Block, b.__class__), {})
        cfg = getattr(model, "pretrained_cfg", None)
        name = cfg.get("architecture", "") if isinstance(cfg, dict) else getattr(cfg, "name", "")
        return HostView(blocks, model.patch_embed.num_patches, model.cls_token, name), originals

    return patch_with_adapter(model, adapt, _PrunedModel, core_patch, **kwargs)
