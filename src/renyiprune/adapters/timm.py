"""timm ``VisionTransformer``: the block interface renyiprune's pruning uses, on timm's own modules.

timm's Block already has norm1/attn/drop_path1/norm2/mlp/drop_path2; what it lacks is ``attn.qkv_heads``
/ ``attn.merge_heads`` (timm runs fused attention inside ``Attention.forward``) and the LayerScale
(``ls1``/``ls2``) in our residual branches. The adapter adds both by re-classing the blocks at the
pruning locations; weights stay timm's. timm is detected by structure and by the modules its classes
come from, so it is never imported here.

Of timm's own classes only those whose computation the pruning block reproduces are accepted: the
``VisionTransformer`` model, its pre-norm ``Block`` and its ``Attention``. Other timm ViTs (post-norm
``ResPostBlock``, parallel blocks, EVA's rotary embeddings, BEiT's relative position bias, CaiT's
late CLS token, ...) carry ``qkv``/``norm1`` too but compute something else, so they are refused by name.
A user's own timm-shaped classes are accepted by structure.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core.hosts import Adaptation, Host, HostView, UnsupportedModelError, check_token_layout

__all__ = ["handles", "adapt", "HOST"]

# Qualified names of the timm classes whose forward the pruning block reproduces (timm 0.9 defined
# Attention in vision_transformer, timm 1.0 in timm.layers.attention).
_TIMM_MODELS = ("timm.models.vision_transformer.VisionTransformer",)
_TIMM_BLOCKS = ("timm.models.vision_transformer.Block",)
_TIMM_ATTENTION = ("timm.layers.attention.Attention", "timm.models.vision_transformer.Attention")


def handles(model: nn.Module) -> bool:
    """A timm-style ViT: ``blocks`` whose attention has a fused ``qkv`` but not our ``qkv_heads``."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks):
        return False
    attn = getattr(blocks[0], "_modules", {}).get("attn")  # the module itself, also once adapted
    return hasattr(attn, "qkv") and not hasattr(attn, "qkv_heads")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _from_timm(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "timm"


class _Attention:
    """qkv_heads / scale / merge_heads on a timm ``Attention`` (q/k norms, scale norm, output gate).

    One instance serves one attention call: ``qkv_heads`` keeps the gate timm computes from the block
    input (``gated=True``) for ``merge_heads`` to apply, as timm's own forward does.
    """

    def __init__(self, att: nn.Module):
        self.att = att
        self.scale = att.scale
        self._gate: Tensor | None = None

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.att
        B, N, C = x.shape
        gate = getattr(a, "gate", None)
        self._gate = gate(x).sigmoid() if gate is not None else None
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
        if self._gate is not None:
            x = x * self._gate
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

    def __call__(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, **kwargs):
        if attn_mask is not None or is_causal or any(v is not None for v in kwargs.values()):
            raise UnsupportedModelError(
                "renyiprune's pruning blocks take no attention mask, causal flag or other block inputs"
            )
        return nn.Module.__call__(self, x)


class _TimmPrunedModel:
    """Mixin before timm's VisionTransformer: starts the pruning state from the input's patch grid (also
    with ``dynamic_img_size``) wherever the blocks are reached through ``forward_features``."""

    renyiprune: object

    def forward_features(self, x: Tensor, *args, **kwargs) -> Tensor:
        drop = getattr(self, "patch_drop", None)
        if self.training and getattr(drop, "prob", 0.0) > 0:
            raise UnsupportedModelError(
                "renyiprune cannot prune a timm model that trains with patch dropout (patch_drop_rate > 0): "
                "the dropped patches are unknown to the pruning blocks; set model.patch_drop = "
                "nn.Identity() or evaluate in eval mode"
            )
        state = self.renyiprune
        state.begin(x.shape[0], _num_patches(self.patch_embed, x, getattr(self, "dynamic_img_size", False)),
                    x.device)  # fmt: skip
        out = super().forward_features(x, *args, **kwargs)
        state.end()
        return out

    def forward_intermediates(self, *args, **kwargs):
        raise UnsupportedModelError(
            "forward_intermediates of a pruned timm model is not supported (it reshapes every block's "
            "tokens to the full patch grid); call renyiprune.unpatch(model) first"
        )


def _num_patches(patch_embed: nn.Module, x: Tensor, dynamic: bool) -> int:
    """Patch tokens the embedding makes of the images ``x`` (B, C, H, W)."""
    if dynamic and hasattr(patch_embed, "dynamic_feat_size"):
        h, w = patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        return int(h) * int(w)
    return patch_embed.num_patches


def _refuse_timm_class(kind: str, cls: type, allowed: tuple[str, ...], owner: str, why: str) -> None:
    """UnsupportedModelError when ``cls`` is one of timm's own classes but not one we reproduce."""
    if _from_timm(cls) and _qualname(cls) not in allowed:
        raise UnsupportedModelError(
            f"renyiprune.patch cannot prune {owner}: its {kind} is timm's {cls.__name__}; {why}"
        )


def _check(model: nn.Module) -> list:
    name = type(model).__name__
    _refuse_timm_class(
        "model class", type(model), _TIMM_MODELS, name,
        "of timm's models only VisionTransformer (ViT, DeiT, DeiT III; a CLS token, no distillation or "
        "register tokens) with its pre-norm Block is supported",
    )  # fmt: skip
    check_token_layout(model, max_prefix=1)  # register / distillation tokens: not verified against timm yet
    blocks = list(model.blocks)
    for i, b in enumerate(blocks):
        att = getattr(b, "attn", None)
        owner = f"block {i} ({type(b).__name__}) of {name}"
        _refuse_timm_class(
            "block", type(b), _TIMM_BLOCKS, owner,
            "only timm's pre-norm Block (x + attn(norm1(x)), then x + mlp(norm2(x))) is supported",
        )  # fmt: skip
        if att is not None:
            _refuse_timm_class(
                "attention", type(att), _TIMM_ATTENTION, owner,
                "only timm's Attention (global softmax attention, no bias in its logits) is supported",
            )  # fmt: skip
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


def adapt(model: nn.Module) -> Adaptation:
    """Check an (unpatched) timm ViT and give its blocks our attention interface; timm's forward stays."""
    blocks = _check(model)
    originals = {}
    for b in blocks:
        originals[id(b)] = b.__class__
        b.__class__ = type(b.__class__.__name__, (_Block, b.__class__), {})
    view = HostView(blocks, model.patch_embed.num_patches, model.cls_token, _model_name(model))
    # A model with timm's forward_features starts the state there; any other (a user's timm-shaped
    # model) at its forward, as a native renyiprune model does (model_mixin None).
    return Adaptation(view, originals, _TimmPrunedModel if _from_timm(type(model)) else None)


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    return cfg.get("architecture", "") if isinstance(cfg, dict) else getattr(cfg, "name", "")


HOST = Host("timm", handles, adapt, _model_name)
