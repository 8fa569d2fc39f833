"""The pruning core: criteria over one block's attention, token selection and merging, the block mixins,
and ``prune`` / ``merge`` / ``unpatch`` applying validated plans. It imports nothing above itself (no
planners, experiments, plotting, training or command line)."""

from .api import apply, is_patched, merge, prune, share_parameters, unpatch
from .attention import AttentionContext, Needs
from .criteria import CRITERIA, list_criteria, make_criterion, register_criterion
from .entropy import renyi_entropy
from .hosts import UnsupportedModelError
from .merge_order import MERGE_ORDERS, list_merge_orders, register_merge_order
from .plans import MergePlan, PrunePlan, Stage
from .selection import keep_count
from .state import PruneState, StageConfig, StageRecord

__all__ = [
    "CRITERIA", "MERGE_ORDERS", "AttentionContext", "MergePlan", "Needs", "PrunePlan", "PruneState", "Stage",
    "StageConfig", "StageRecord", "UnsupportedModelError", "apply", "is_patched", "keep_count",
    "list_criteria", "list_merge_orders", "make_criterion", "merge", "prune", "register_criterion",
    "register_merge_order", "renyi_entropy", "share_parameters", "unpatch",
]  # fmt: skip
