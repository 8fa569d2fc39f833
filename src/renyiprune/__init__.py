"""renyiprune: prune Vision Transformer patches whose attention is spread thin (Rényi entropy).

The public API is these 15 names (docs/api.md); everything else is imported from its module.
Layers and what each holds: docs/architecture.md (the order itself: ``renyiprune._layers``).
"""

from . import adapters  # noqa: F401  (registers the Hugging Face and timm hosts)
from .api import patch
from .core.api import merge, prune, unpatch
from .core.criteria import list_criteria, register_criterion
from .core.hosts import UnsupportedModelError
from .core.plans import MergePlan, PrunePlan
from .core.state import records
from .models.model import create_model, list_models
from .models.weights import WeightsError
from .planning.budget import plan_for_budget
from .planning.policy import load_policy

__version__ = "0.1.0"

__all__ = [
    "MergePlan",
    "PrunePlan",
    "UnsupportedModelError",
    "WeightsError",
    "create_model",
    "list_criteria",
    "list_models",
    "load_policy",
    "merge",
    "patch",
    "plan_for_budget",
    "prune",
    "records",
    "register_criterion",
    "unpatch",
]
