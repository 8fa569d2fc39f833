"""Oxford Flowers-102 fine-tuned with pruning in the loop (the method paper's own benchmark): the
unpruned model once, then at keep 0.9, 0.7 and 0.5 EViT, Shannon (Rényi α = 1), Rényi α = 2 and ∞ in
the chosen reading, and the best training-free criterion, one ``renyiprune train`` run each with the
same recipe and seed. The unpruned run is evaluated after every epoch (its learning curve in
OUT/unpruned/metrics.csv). Trains on ``train`` (the official ``trnid``), evaluates on ``val`` (``valid``).

The machinery is ``cars_finetune``'s (resumable runs, one folder each, ``--report`` with paired
intervals and the choice on the calibration half of ``val``); this file holds the Flowers grid and
recipe.

    python benchmarks/flowers_finetune.py --data-root FLOWERS --out runs/flowers-ft [--device cuda]
    python benchmarks/flowers_finetune.py --data-root FLOWERS --out runs/flowers-ft --only unpruned evit-k0.7
    python benchmarks/flowers_finetune.py ... --cls-out-runs --only renyi-exclude-a2-k0.7   # CLS key out
    python benchmarks/flowers_finetune.py --data-root FLOWERS --out runs/flowers-ft --report \\
        --policy-out src/renyiprune/planning/policies/deit_tiny_patch16_224-flowers102-finetuned.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cars_finetune as ft  # noqa: E402

KEEPS = (0.9, 0.7, 0.5)
ALPHAS = (1.0, 2.0, float("inf"))  # α = 1 is Shannon
#: The Rényi reading every entropy run uses (docs/method.md): the library's default (each patch's row over
#: all keys, CLS included; entropy per head, then averaged), the best reading on the calibration half of
#: val in the training-free probe (benchmarks/results/readings). ``--cls-out-runs`` adds the CLS-excluded
#: reading, the paper's literal one, at α = 2 (EXTRA), to measure that reading after training.
READING = ""
EXTRA = tuple(ft.Run("renyi", k, 2.0, "cls_key=exclude") for k in (0.7, 0.5))
BEST = "pagerank"
EPOCHS = 12

#: One recipe for every run (``renyiprune train`` flags): DeiT's random-resized crop (at least 35 % of
#: the image) and centre-crop evaluation, the embeddings and the three unpruned blocks frozen, the head
#: started from the linear probe, AdamW with a one-epoch warm-up and cosine decay, label smoothing.
RECIPE = (
    "--locations", "3,6,9", "--fuse", "--freeze-blocks", "3", "--transform", "center-crop",
    "--crop-scale", "0.35", "--head-init", "probe", "--batch-size", "32", "--lr", "1e-4", "--no-lr-scale",
    "--warmup-epochs", "1", "--warmup-lr", "1e-6", "--min-lr", "1e-6", "--weight-decay", "0.05",
    "--smoothing", "0.1", "--mixup", "0", "--cutmix", "0", "--randaug-n", "0", "--reprob", "0",
    "--drop-path", "0",
)  # fmt: skip


def grid(best: str | None, keeps=KEEPS, reading: str = READING, extra: bool = False) -> list[ft.Run]:
    """The unpruned run, then per keep rate EViT, Rényi at each α (in ``reading``) and ``best``; ``extra``:
    the CLS-excluded Rényi runs too."""
    runs = [ft.Run("none", 1.0)]
    for k in keeps:
        runs.append(ft.Run("evit", k))
        runs += [ft.Run("renyi", k, a, reading) for a in ALPHAS]
        if best and best not in ("evit", "renyi"):
            runs.append(ft.Run(best, k))
    return runs + [r for r in EXTRA if extra and r.keep in keeps]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {"--dataset": "flowers102", "--train-split": "train", "--eval-split": "val",
                "--epochs": str(EPOCHS), "--best": BEST}  # fmt: skip
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    extra = "--cls-out-runs" in argv
    args = ft.parse_args([a for a in argv if a != "--cls-out-runs"])
    args.recipe = RECIPE
    args.script = "benchmarks/flowers_finetune.py"
    return ft.run_grid(args, grid(args.best, KEEPS if args.keeps == ft.KEEPS else args.keeps, extra=extra))

if __name__ == "__main__":
    raise SystemExit(main())
