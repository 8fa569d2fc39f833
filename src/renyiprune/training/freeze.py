"""``--freeze-blocks N``: the input end of the ViT stays as pretrained and costs no backward pass.

The patch embedding, the position embedding, the CLS token and blocks 0..N-1 get
``requires_grad=False``, so autograd records nothing for them (no activations are kept, the backward
pass stops at block N) and the optimiser never sees them; their modules run in eval mode (no
drop-path), so they are a fixed feature extractor. With pruning at blocks 3, 6, 9, ``N = 3`` freezes
exactly the blocks that see all the tokens.
"""

from __future__ import annotations

from torch import nn

__all__ = ["freeze_prefix", "frozen_modules"]


def frozen_modules(model: nn.Module, blocks: int) -> list[nn.Module]:
    """The modules ``--freeze-blocks blocks`` freezes (empty for 0); ValueError past the model's depth."""
    depth = len(model.blocks)
    if not 0 <= blocks <= depth:
        raise ValueError(f"--freeze-blocks must be in 0..{depth} for a {depth}-block model, got {blocks}")
    if blocks == 0:
        return []
    return [model.patch_embed, *list(model.blocks)[:blocks]]


def freeze_prefix(model: nn.Module, blocks: int) -> list[str]:
    """Freeze the embeddings and ``blocks[:blocks]`` of ``model``; returns the frozen parameters' names."""
    modules = frozen_modules(model, blocks)
    if not modules:
        return []
    frozen = {id(p) for m in modules for p in m.parameters()}
    frozen |= {id(model.cls_token), id(model.pos_embed)}
    names = []
    for name, p in model.named_parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
            names.append(name)
    return names
