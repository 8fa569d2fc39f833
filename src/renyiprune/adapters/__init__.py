"""Host adapters: Hugging Face ``transformers`` ViT/DeiT and timm's ``VisionTransformer``.

Each adapter registers a ``core.hosts.Host`` when this package is imported (``import renyiprune`` does),
so that ``prune``/``merge``/``patch`` accept those models; the core never imports an adapter.
"""

from ..core.hosts import UnsupportedModelError, check_token_layout, register_host
from . import hf, timm

__all__ = ["UnsupportedModelError", "check_token_layout", "hf", "timm"]

register_host(hf.HOST)
register_host(timm.HOST)
