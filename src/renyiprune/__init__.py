"""renyiprune: prune Vision Transformer patches whose attention is spread thin (Rényi entropy)."""

from .criteria import CRITERIA, AttentionContext, list_criteria, make_criterion, register_criterion
from .entropy import renyi_entropy
from .flops import count_gmacs
from .merge_order import MERGE_ORDERS, list_merge_orders, register_merge_order
from .model import MODELS, VisionTransformer, create_model, list_models, register_model
from .patch import PruneState, is_patched, patch, unpatch
from .selection import keep_count

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "MERGE_ORDERS",
    "MODELS",
    "AttentionContext",
    "PruneState",
    "VisionTransformer",
    "count_gmacs",
    "create_model",
    "is_patched",
    "keep_count",
    "list_criteria",
    "list_merge_orders",
    "list_models",
    "make_criterion",
    "patch",
    "register_criterion",
    "register_merge_order",
    "register_model",
    "renyi_entropy",
    "unpatch",
]
