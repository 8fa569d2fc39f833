"""Stanford Cars fine-tuned with pruning in the loop: EViT, Rényi α = 1, 2, ∞ and the best training-free
criterion, at keep 0.7 and 0.5, one ``renyiprune train`` run each with the same recipe and seed.

Two steps:

* training (default): every run of the grid (or ``--only NAME ...``) is a separate ``renyiprune train``
  process writing OUT/<name>/. A finished run is skipped; an interrupted one resumes from its last
  checkpoint (written every ``--save-every`` steps); ``train`` refuses to resume a run whose settings
  changed. The first run fits the linear-probe head (``--head-init probe``) and keeps it in
  OUT/probe-cache, so every run starts from the same head.
* ``--report``: each finished run's final weights (OUT/<name>/model.safetensors) are evaluated on the
  evaluation split with the configuration and transform the run trained with (what ``renyiprune eval``
  computes: the same pruned view, top-1/top-5, GMACs; per-image outcomes kept in
  OUT/<name>/val_outcomes.json), and OUT/report.md and OUT/report.json are written: every run with a
  paired 95 % interval against EViT at the same keep rate, and per keep rate the Rényi α chosen on the
  calibration half of the split (``experiments.tune``: SHA-256 of the file name) among the fine-tuned α
  runs, reported on the evaluation half against EViT.

    python benchmarks/cars_finetune.py --data-root CARS --out runs/cars-ft [--device cuda] [--epochs 3]
    python benchmarks/cars_finetune.py --data-root CARS --out runs/cars-ft --report
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from renyiprune.core.criteria import list_criteria, takes_alpha
from renyiprune.data.datasets import load_split
from renyiprune.data.images import ImageDataset, check_bad, collate
from renyiprune.experiments.evaluate import pruned_view, top1_top5
from renyiprune.experiments.stats import paired_summary, select_outcomes, top1_of_outcomes
from renyiprune.experiments.tune import choose, is_calibration, policy_document
from renyiprune.models.model import create_model
from renyiprune.models.weights import read_state_dict, sha256_file
from renyiprune.planning.flops import count_gmacs
from renyiprune.planning.points import Point
from renyiprune.planning.specs import parse_options, split_criterion
from renyiprune.training.checkpoint import load_checkpoint
from renyiprune.training.train import CHECKPOINT, WEIGHTS
from renyiprune.training.transforms import eval_view

ROOT = Path(__file__).resolve().parents[1]
DEMO_WEIGHTS = ROOT / "demo" / "weights" / "deit_tiny_patch16_224.safetensors"
MODEL = "deit_tiny_patch16_224"
KEEPS = (0.7, 0.5)
ALPHAS = (1.0, 2.0, float("inf"))
OUTCOMES = "val_outcomes.json"

#: The recipe every run shares (``renyiprune train`` flags), chosen for a short fine-tune on a CPU:
#: the embeddings and the three unpruned blocks frozen, the whole image (a random box of it while
#: training), the head started from the linear probe, light augmentation. Not tuned for accuracy.
RECIPE = (
    "--locations", "3,6,9", "--fuse", "--freeze-blocks", "3", "--transform", "resize", "--crop-scale", "0.35",
    "--head-init", "probe", "--batch-size", "64", "--lr", "1e-4", "--no-lr-scale", "--warmup-epochs", "0.25",
    "--warmup-lr", "1e-6", "--min-lr", "1e-6", "--weight-decay", "0.05", "--smoothing", "0.1",
    "--mixup", "0", "--cutmix", "0", "--randaug-n", "0", "--reprob", "0", "--drop-path", "0",
)  # fmt: skip


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of the grid."""

    criterion: str  # "none": the unpruned model
    keep: float
    alpha: float = 1.0
    options: str = ""  # criterion options as in renyi[cls_key=exclude]: "cls_key=exclude"

    @property
    def name(self) -> str:
        if self.criterion == "none":
            return "unpruned"
        a = (
            f"-a{'inf' if math.isinf(self.alpha) else f'{self.alpha:g}'}"
            if takes_alpha(self.criterion)
            else ""
        )
        o = "".join(f"-{v}" for v in sorted(parse_options(self.options).values()))  # -exclude
        return f"{self.criterion}{o}{a}-k{self.keep:g}"

    @property
    def spec(self) -> str:
        return f"{self.criterion}[{self.options}]" if self.options else self.criterion

    def flags(self) -> list[str]:
        if self.criterion == "none":
            return ["--criterion", "none"]
        return ["--criterion", self.spec, "--keep", f"{self.keep:g}", "--alpha", f"{self.alpha:g}"]


def grid(best: str | None, keeps=KEEPS) -> list[Run]:
    """The issue's grid, keep rate by keep rate: EViT, Rényi at each α, the best training-free one."""
    runs = []
    for k in keeps:
        runs.append(Run("evit", k))
        runs += [Run("renyi", k, a) for a in ALPHAS]
        if best and best not in ("evit", "renyi"):
            runs.append(Run(best, k))
    return runs


def run_state(out: Path, epochs: int) -> str:
    """'done' (its checkpoint is at the end of the last epoch), 'partial' (a checkpoint) or 'new'."""
    ckpt = out / CHECKPOINT
    if not ckpt.is_file():
        return "new"
    pos = load_checkpoint(ckpt)["position"]
    return "done" if pos["epoch"] >= epochs and pos["step_in_epoch"] == 0 else "partial"


def train_command(run: Run, args: argparse.Namespace) -> list[str]:
    """The ``renyiprune train`` command line of ``run`` (always with --resume: a new run just starts)."""
    cmd = [sys.executable, "-m", "renyiprune", "train", "--model", MODEL, "--weights", str(args.weights),
           "--dataset", args.dataset, "--data-root", str(args.data_root), "--train-split", args.train_split,
           "--eval-split", args.eval_split, "--out", str(args.out / run.name),
           *getattr(args, "recipe", RECIPE), *run.flags(),
           "--epochs", str(args.epochs), "--seed", str(args.seed),
           "--head-cache", str(args.out / "probe-cache"),
           "--save-every", str(args.save_every), "--eval-every", str(1 if run.criterion == "none" else 0),
           "--no-eval-before",
           "--device", args.device, "--workers", str(args.workers), "--resume"]  # fmt: skip
    for flag, value in (
        ("--threads", args.threads),
        ("--limit", args.limit),
        ("--max-steps", args.max_steps),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    if args.batch_size is not None:
        cmd += ["--batch-size", str(args.batch_size)]  # the later flag wins
    if args.amp != "none":
        cmd += ["--amp", args.amp]
    if args.no_progress:
        cmd.append("--no-progress")
    return cmd


def train_all(args: argparse.Namespace, runs: list[Run]) -> int:
    for run in runs:
        out = args.out / run.name
        state = run_state(out, args.epochs)
        if state == "done":
            print(f"{run.name}: finished, skipped", flush=True)
            continue
        print(f"{run.name}: {'resuming' if state == 'partial' else 'starting'}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(train_command(run, args)).returncode
        if rc != 0:
            print(f"{run.name}: renyiprune train exited with status {rc}", file=sys.stderr)
            return rc
        print(f"{run.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- report


def _bits(hits: torch.Tensor) -> str:
    return "".join("1" if h else "0" for h in hits.tolist())


@torch.inference_mode()
def evaluate_run(out: Path, args: argparse.Namespace) -> dict:
    """Top-1/top-5/GMACs and per-image outcomes of a finished run on the evaluation split (cached in
    OUT/<name>/val_outcomes.json, keyed by the weights' SHA-256 and the images)."""
    cfg = load_checkpoint(out / CHECKPOINT)["config"]
    split = load_split(cfg["dataset"], args.data_root, cfg["eval_split"])
    samples = split.samples[: args.limit] if args.limit else split.samples
    key = {"weights": sha256_file(out / WEIGHTS), "images": [str(s.path) for s in samples]}
    cached = out / OUTCOMES
    if cached.is_file():
        rec = json.loads(cached.read_text())
        if rec.get("key") == key:
            return rec
    weights = read_state_dict(out / WEIGHTS)
    model = create_model(cfg["model"], weights=weights, num_classes=int(weights["head.weight"].shape[0]))
    model = model.to(args.device)
    crit, opts = split_criterion(cfg["criterion"])
    config = (
        Point.from_spec(None)
        if crit == "none"
        else Point.from_spec(crit, cfg["keep"], float(cfg["alpha"]), tuple(cfg["locations"]), cfg["fuse"],
                             opts)
    )  # fmt: skip
    view = pruned_view(model, config)
    tf = eval_view(cfg["transform"], model.pretrained_cfg, split.crop_bottom)
    loader = DataLoader(ImageDataset(samples, tf), batch_size=args.eval_batch_size, num_workers=args.workers,
                        collate_fn=collate)  # fmt: skip
    top1, top5 = [], []
    t0 = time.perf_counter()
    for batch in loader:
        check_bad(batch, False)
        h1, h5 = top1_top5(view(batch.images.to(args.device)).float(), batch.labels.to(args.device))
        top1.append(h1.cpu())
        top5.append(h5.cpu())
    h1, h5 = torch.cat(top1), torch.cat(top5)
    rec = {
        "key": key,
        "run": out.name,
        "config": config.label,
        "criterion": crit,
        "options": opts,
        "alpha": "inf" if math.isinf(float(cfg["alpha"])) else float(cfg["alpha"]),
        "keep": 1.0 if crit == "none" else cfg["keep"],
        "transform": cfg["transform"],
        "epochs": cfg["epochs"],
        "images": len(samples),
        "top1": 100.0 * int(h1.sum()) / len(samples),  # as renyiprune eval counts it
        "top5": 100.0 * int(h5.sum()) / len(samples),
        "gmacs": count_gmacs(view),
        "correct": _bits(h1),
        "eval_seconds": time.perf_counter() - t0,
    }
    cached.write_text(json.dumps(rec) + "\n")
    return rec


def _ci(d: dict | None) -> str:
    return "-" if d is None else f"{d['delta']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"


def _alpha(r: dict) -> str:
    if not takes_alpha(r["criterion"]):
        return ""
    return "∞" if r["alpha"] == "inf" else f"{r['alpha']:g}"


def build_report(records: list[dict], calib: list[bool]) -> tuple[str, dict]:
    """The markdown tables and the JSON summary of the evaluated runs (same images, same order)."""
    evalh = [not c for c in calib]
    for r in records:
        r["calibration_top1"] = top1_of_outcomes(select_outcomes(r["correct"], calib))
        r["evaluation_top1"] = top1_of_outcomes(select_outcomes(r["correct"], evalh))
    evit = {r["keep"]: r for r in records if r["criterion"] == "evit"}
    for r in records:
        twin = evit.get(r["keep"])
        r["vs_evit"] = paired_summary(r["correct"], twin["correct"]) if twin and twin is not r else None
    n = records[0]["images"] if records else 0
    lines = [
        f"Evaluation split: {n} images ({sum(calib)} calibration, {sum(evalh)} evaluation half).\n",
        "| run | criterion | α | keep | top-1 % | top-5 % | GMACs | Δ top-1 vs EViT [95 % CI] | McNemar p "
        "| cal. top-1 | eval. top-1 |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in sorted(records, key=lambda r: (-r["keep"], r["criterion"] != "evit", r["run"])):
        p = f"{r['vs_evit']['p_mcnemar']:.2f}" if r["vs_evit"] else "-"
        lines.append(f"| {r['run']} | {r['criterion']} | {_alpha(r)} | {r['keep']:g} | {r['top1']:.2f} | "
                     f"{r['top5']:.2f} | {r['gmacs']:.3f} | {_ci(r['vs_evit'])} | {p} | "
                     f"{r['calibration_top1']:.2f} | {r['evaluation_top1']:.2f} |")  # fmt: skip
    lines += [
        "\nRényi's α chosen on the calibration half among the fine-tuned α runs, reported on the "
        "evaluation half:\n",
        "| keep | chosen α | cal. top-1 | eval. top-1 | EViT eval. top-1 | "
        "Δ vs EViT on eval. half [95 % CI] | McNemar p |",
        "|---|---|---:|---:|---:|---|---:|",
    ]  # fmt: skip
    chosen = {}
    for k in sorted({r["keep"] for r in records}, reverse=True):
        renyi = [r for r in records if r["keep"] == k and r["criterion"] == "renyi"]
        if not renyi or k not in evit:
            continue
        cand = [{"config": {"criterion": "renyi", "alpha": r["alpha"]}, "label": r["run"],
                 "top1": r["calibration_top1"], "gmacs": r["gmacs"]} for r in renyi]  # fmt: skip
        best = next(r for r in renyi if r["run"] == choose(cand)["best"]["label"])
        pair = paired_summary(
            select_outcomes(best["correct"], evalh), select_outcomes(evit[k]["correct"], evalh)
        )
        chosen[f"{k:g}"] = {"run": best["run"], "alpha": best["alpha"], "evaluation_vs_evit": pair,
                            "calibration_top1": best["calibration_top1"],
                            "evaluation_top1": best["evaluation_top1"],
                            "evit_evaluation_top1": evit[k]["evaluation_top1"]}  # fmt: skip
        lines.append(f"| {k:g} | {_alpha(best)} | {best['calibration_top1']:.2f} | "
                     f"{best['evaluation_top1']:.2f} | {evit[k]['evaluation_top1']:.2f} | {_ci(pair)} | "
                     f"{pair['p_mcnemar']:.2f} |")  # fmt: skip
    summary = {"images": n, "calibration_images": sum(calib), "runs": records, "renyi_alpha_chosen": chosen}
    summary["policy_keep"] = finetuned_policy_keep(records)
    return "\n".join(lines) + "\n", summary


def finetuned_policy_keep(records: list[dict]) -> dict:
    """Per keep rate, the fine-tuned runs ranked on the calibration half (``experiments.tune.choose``):
    ``best`` over all of them and one entry per criterion (Rényi: its α), the policy file's ``keep``."""
    out = {}
    for k in sorted({r["keep"] for r in records if r["criterion"] != "none"}, reverse=True):
        cand = [{"config": {"criterion": r["criterion"], "alpha": r["alpha"],
                            "options": r.get("options", {})},
                 "label": r["run"], "top1": r["calibration_top1"], "gmacs": r["gmacs"]}
                for r in records if r["keep"] == k]  # fmt: skip
        out[f"{k:g}"] = choose(cand)
    return out


def write_policy(path: Path, summary: dict, epochs: int, dataset: str = "stanford-cars",
                 script: str = "benchmarks/cars_finetune.py") -> None:
    """The fine-tuned α / criterion choice as a policy file (the probe's schema): which configuration to
    fine-tune with at each keep rate, chosen on the calibration half of the evaluation split."""
    policy = policy_document(
        MODEL,
        summary["policy_keep"],
        locations=(3, 6, 9),
        fuse=True,
        images=(summary["calibration_images"], summary["images"] - summary["calibration_images"]),
        candidates=[r["criterion"] for r in summary["runs"]],
        alphas=sorted({r["alpha"] for r in summary["runs"] if r["criterion"] == "renyi"}, key=float),
        dataset=dataset,
        protocol=f"fine-tuned with pruning in the loop ({epochs} epochs, the recipe of "
        f"{script}), chosen on val; each entry is the configuration its fine-tuned "
        "weights were trained and evaluated with",
    )
    path.write_text(json.dumps(policy, indent=2, allow_nan=False) + "\n")


def report(args: argparse.Namespace, runs: list[Run]) -> int:
    records, missing = [], []
    for run in runs:
        out = args.out / run.name
        if run_state(out, args.epochs) != "done":
            missing.append(run.name)
            continue
        # the cache key (weights hash, image paths) stays in OUT/<name>/val_outcomes.json, not the report
        records.append({k: v for k, v in evaluate_run(out, args).items() if k != "key"})
        r = records[-1]
        print(
            f"{run.name}: top-1 {r['top1']:.2f} %, top-5 {r['top5']:.2f} %, {r['gmacs']:.3f} GMACs",
            flush=True,
        )
    if not records:
        print("no finished run to report", file=sys.stderr)
        return 1
    if len({r["images"] for r in records}) != 1:
        raise ValueError("the runs were evaluated on different images")
    split = load_split(args.dataset, args.data_root, args.eval_split)
    samples = split.samples[: args.limit] if args.limit else split.samples
    text, summary = build_report(records, [is_calibration(s.path) for s in samples])
    summary["not_finished"] = missing
    if missing:
        text += f"\nNot finished (not in the tables): {', '.join(missing)}.\n"
    (args.out / "report.md").write_text(text)
    (args.out / "report.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    if args.policy_out:
        write_policy(args.policy_out, summary, args.epochs, args.dataset, getattr(args, "script", None)
                     or "benchmarks/cars_finetune.py")
    print(text)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, required=True, help="Stanford Cars (train/, val/, classes.txt)")
    ap.add_argument("--dataset", default="stanford-cars")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--eval-split", default="val")
    ap.add_argument("--out", type=Path, required=True, help="one folder per run, and the report")
    ap.add_argument("--weights", type=Path, default=DEMO_WEIGHTS, help="DeiT-Tiny's ImageNet weights")
    ap.add_argument(
        "--best",
        default="pagerank",
        help="the best training-free criterion: the probe's best mean calibration-half top-1 over keep "
        "0.5 and 0.7 (benchmarks/results/cars_probe); none: leave out",
    )
    ap.add_argument("--keeps", type=lambda t: tuple(float(v) for v in t.split(",")), default=KEEPS)
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME", help="these runs of the grid only")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None, help="override the recipe's 64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps")
    ap.add_argument("--limit", type=int, default=None, help="first N images of each split (smoke tests)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop each run after N steps in total")
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", action="store_true", help="evaluate the finished runs and write the tables")
    ap.add_argument(
        "--policy-out", type=Path, default=None, help="with --report: the choice as a policy file"
    )
    ap.add_argument("--list", action="store_true", help="print the runs' names and commands, run nothing")
    args = ap.parse_args(argv)
    if args.best is not None and args.best.lower() == "none":
        args.best = None
    if args.best is not None and args.best not in list_criteria():
        ap.error(f"--best {args.best}: not a criterion ({', '.join(list_criteria())})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_grid(args, grid(args.best, args.keeps))


def run_grid(args: argparse.Namespace, runs: list[Run]) -> int:
    """Train (or with ``--report`` evaluate and tabulate) ``runs``, ``--only`` narrowing them."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        names = {r.name for r in runs}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            raise SystemExit(f"--only: {', '.join(unknown)} not in the grid ({', '.join(sorted(names))})")
        runs = [r for r in runs if r.name in args.only]
    if args.list:
        for r in runs:
            print(r.name, " ".join(train_command(r, args)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    return report(args, runs) if args.report else train_all(args, runs)


if __name__ == "__main__":
    raise SystemExit(main())
