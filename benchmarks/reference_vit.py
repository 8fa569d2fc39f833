"""A minimal ViT forward on ``scaled_dot_product_attention``: the speed floor for the unpruned model.

It holds no modules of its own, only the weights of a renyiprune ``VisionTransformer`` (timm names),
and runs the plainest forward torch offers: one fused qkv matmul, SDPA, one projection, the MLP.
``bench`` compares the unpruned model against it in the same run. With ``tokens`` it is also the floor
of a pruned forward: at the given blocks, after the attention residual, it keeps the first tokens (no
scoring, selection or fusion), so its efficiency is what the smaller matmuls alone give.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ReferenceViT(nn.Module):
    """Same math as ``models.model.VisionTransformer.forward``, written as straight-line tensor code."""

    def __init__(self, model: nn.Module, tokens: dict[int, int] | None = None):
        """``tokens``: {block index: tokens kept after its attention}, e.g. a pruned forward's counts."""
        super().__init__()
        self.tokens = dict(tokens or {})
        self.p = dict(model.named_parameters())
        self.heads = model.blocks[0].attn.num_heads
        self.patch = model.patch_embed.patch_size[0]
        self.eps = model.norm.eps
        self.depth = len(model.blocks)

    def forward(self, x: Tensor) -> Tensor:
        p, eps = self.p, self.eps
        x = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=self.patch)
        x = x.flatten(2).transpose(1, 2)
        B, _, C = x.shape
        x = torch.cat([p["cls_token"].expand(B, -1, -1), x], dim=1) + p["pos_embed"]
        H, D = self.heads, C // self.heads
        for i in range(self.depth):
            b = f"blocks.{i}."
            h = F.layer_norm(x, (C,), p[b + "norm1.weight"], p[b + "norm1.bias"], eps)
            qkv = F.linear(h, p[b + "attn.qkv.weight"], p[b + "attn.qkv.bias"])
            q, k, v = qkv.view(B, -1, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, C)
            x = x + F.linear(a, p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])
            if i in self.tokens:
                x = x[:, : self.tokens[i]].contiguous()
            h = F.layer_norm(x, (C,), p[b + "norm2.weight"], p[b + "norm2.bias"], eps)
            h = F.gelu(F.linear(h, p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"]))
            x = x + F.linear(h, p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"])
        x = F.layer_norm(x[:, 0], (C,), p["norm.weight"], p["norm.bias"], eps)
        return F.linear(x, p["head.weight"], p["head.bias"])
