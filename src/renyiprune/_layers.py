"""The layers of renyiprune, bottom first: a module may import only from its own layer or the ones below.

Each entry is a subpackage or module of ``renyiprune``; a module belongs to the longest entry its name
starts with, and a package's ``__init__`` to the highest layer inside that package. The core is listed
module by module, so that its own order (entropy -> attention -> criteria -> selection/merging -> state ->
blocks -> prune/merge) is checked too. ``tests/unit/test_layers.py`` walks every import of every module
(function-level ones included) and fails on an upward import or a cycle; docs/architecture.md draws it.
The package root (``renyiprune/__init__.py``, the public API) and ``__main__`` stand above all layers.
"""

LAYERS: tuple[str, ...] = (
    "_layers",
    "utils",  # atomic files and verified downloads (io), torch.distributed helpers
    "core.entropy",  # Rényi entropy of softmax(logits)
    "core.attention",  # attention logits, explicit q/k/v, AttentionContext, Needs
    "core.streamed",  # attention without the N x N matrix: only what a criterion declared
    "core.criteria",  # the registry of token-importance criteria
    "core.merge_order",  # ToMe merge orders
    "core.selection",  # keeping the top patches, fusing the rest
    "core.merging",  # bipartite matching, merging into kept tokens
    "core.state",  # PruneState, StageConfig, StageRecord, unpatch
    "core.hosts",  # the host-model registry and model checks
    "core.plans",  # PrunePlan, Stage, MergePlan
    "core.blocks",  # the pruning/merging block mixins
    "core.api",  # prune, merge, apply, share_parameters
    "adapters",  # Hugging Face and timm hosts (register into core.hosts)
    "models",  # renyiprune's ViT, weights, HF weight conversion, ONNX export
    "data",  # images and transforms, named data sets, training augmentation
    "planning",  # GMACs, budget planner, configuration specs, build_plan, tuned policies
    "api",  # patch(**kwargs): the keyword convenience over plans and planners
    "experiments",  # evaluate, sweep, probe, tune, stats, tables, benchmark, pareto
    "training",  # fine-tuning with pruning, checkpoints
    "viz",  # attention inspection, plots, HTML report
    "cli",  # the renyiprune command
)
