"""The layers of renyiprune, bottom first: a module may import only from its own layer or the ones below.

Each entry is a subpackage or module of ``renyiprune``; a module belongs to the longest entry its name
starts with, and a package's ``__init__`` to the highest layer inside that package. The core is listed
module by module, so that its own order (entropy -> attention -> criteria -> selection/merging -> state ->
blocks -> prune/merge) is checked too; so are the models, data, planning and experiments packages.
``tests/unit/test_layers.py`` walks every import of every module (function-level ones included) and
fails on an upward import or a cycle; docs/architecture.md draws it.
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
    "core.api",  # prune, merge, apply, share_parameters, unpatched_copy
    "adapters",  # Hugging Face and timm hosts (register into core.hosts)
    "models.weights",  # weight files: safetensors/.pth reading, verified downloads, pos-embed resampling
    "models.model",  # renyiprune's VisionTransformer and its registry of named variants
    "models.hf",  # Hugging Face weight names <-> ours
    "models.export",  # ONNX export of a pruned model
    "data.images",  # image folders, decoding, the evaluation transform
    "data.augment",  # training augmentation
    "data.datasets",  # named data sets (Flowers-102, FGVC-Aircraft, ImageNet-100, Stanford Cars, ...)
    "planning.flops",  # GMACs of a (pruned) forward
    "planning.specs",  # the criterion grammar of the command line (renyi[heads=pooled], per-stage specs)
    "planning.build",  # PatchArgs, build_plan: a plan from patch() keywords
    "planning.budget",  # plan_for_budget: a keep rate or r for a GMACs fraction
    "planning.points",  # Point: a plan with its compute budget or adaptive keep, as runs take it
    "planning.policy",  # tuned policies: policy.best
    "api",  # patch(**kwargs): the keyword convenience over plans and planners
    "experiments.stats",  # paired intervals, McNemar
    "experiments.tables",  # CSV / Markdown tables of results
    "experiments.tune",  # calibration / evaluation split, choosing on calibration
    "experiments.evaluate",  # top-1/top-5, GMACs, images/s of pruning configurations
    "experiments.grid",  # the points a sweep crosses (criteria x orders x keep rates x fusion)
    "experiments.sweep",  # resumable sweeps over configurations on decoded images
    "experiments.benchmark",  # interleaved timing and peak memory
    "experiments.probe_fit",  # the probe's logistic head: L-BFGS fit, L2 chosen on a held-out part
    "experiments.probe_cache",  # the probe's disk feature cache and the hash of the feature code
    "experiments.probe",  # linear probes under pruning
    "experiments.pareto",  # Pareto plots
    "experiments.runs",  # ImageRun, run_points, run_grid_sweep: sweeps as the commands run them
    "experiments.tuning",  # tune_alpha, tune_budget: choose on a calibration half, report, write a policy
    "training",  # fine-tuning with pruning, checkpoints
    "viz",  # attention inspection, plots, HTML report
    "cli",  # the renyiprune command
)
