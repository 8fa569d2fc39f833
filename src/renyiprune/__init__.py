"""renyiprune: prune Vision Transformer patches whose attention is spread thin (Rényi entropy).

The plan API: ``prune(model, PrunePlan)``, ``merge(model, MergePlan)``, ``unpatch(model)``; planners
``plan_for_budget`` and ``policy.best``; ``patch(model, **kwargs)`` is the keyword convenience over them.
Layers and what each holds: docs/architecture.md (the order itself: ``renyiprune._layers``).
"""

from . import adapters  # noqa: F401  (registers the Hugging Face and timm hosts)
from .api import patch
from .core.api import apply, is_patched, merge, prune, share_parameters, unpatch
from .core.attention import AttentionContext, Needs
from .core.criteria import CRITERIA, list_criteria, make_criterion, register_criterion
from .core.entropy import renyi_entropy
from .core.hosts import UnsupportedModelError
from .core.merge_order import MERGE_ORDERS, list_merge_orders, register_merge_order
from .core.plans import MergePlan, PrunePlan, Stage
from .core.selection import keep_count
from .core.state import PruneState
from .models.model import MODELS, VisionTransformer, create_model, list_models, register_model
from .planning import policy
from .planning.budget import plan_for_budget
from .planning.flops import count_gmacs

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "MERGE_ORDERS",
    "MODELS",
    "AttentionContext",
    "MergePlan",
    "Needs",
    "PrunePlan",
    "PruneState",
    "Stage",
    "UnsupportedModelError",
    "VisionTransformer",
    "apply",
    "count_gmacs",
    "create_model",
    "is_patched",
    "keep_count",
    "list_criteria",
    "list_merge_orders",
    "list_models",
    "make_criterion",
    "merge",
    "patch",
    "plan_for_budget",
    "policy",
    "prune",
    "register_criterion",
    "register_merge_order",
    "register_model",
    "renyi_entropy",
    "share_parameters",
    "unpatch",
]
