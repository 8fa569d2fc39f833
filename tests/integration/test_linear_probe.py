"""``renyiprune probe``: the logistic head against an independent optimum, features from the shared
prefix against full pruned forwards, one prefix pass per image, the feature cache, the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from plan_points import point

from renyiprune.cli import main
from renyiprune.data.datasets import ResizeTransform
from renyiprune.data.images import list_samples, load_image
from renyiprune.experiments import probe as pr
from renyiprune.experiments import sweep as sw
from renyiprune.models.model import create_model
from renyiprune.utils.io import LOCK_FILE

WEIGHTS = Path(__file__).resolve().parents[2] / "demo" / "weights" / "deit_tiny_patch16_224.safetensors"
CLASSES = (3, 60, 120, 190)  # four Stanford Cars classes, relabelled 0..3 in the tiny folders


@pytest.fixture(scope="module")
def model():
    return create_model("deit_tiny_patch16_224", weights=WEIGHTS)


def _tiny(src: Path, dst: Path, per_class: int) -> Path:
    """A labels.tsv folder with the first ``per_class`` images of each of CLASSES from ``src``."""
    dst.mkdir(parents=True)
    rows = []
    for new, cls in enumerate(CLASSES):
        for s in [s for s in list_samples(src) if s.label == cls][:per_class]:
            (dst / s.path.name).symlink_to(s.path)
            rows.append(f"{s.path.name}\t{new}")
    (dst / "labels.tsv").write_text("\n".join(rows) + "\n")
    return dst


@pytest.fixture(scope="module")
def cars(shared_assets, tmp_path_factory):
    """Tiny real Stanford Cars folders: train (6 per class), val (3 per class), val2 (2 per class)."""
    root = tmp_path_factory.mktemp("cars")
    src = shared_assets / "stanford-cars"
    return {
        "train": _tiny(src / "train", root / "train", 6),
        "val": _tiny(src / "val", root / "val", 3),
        "val2": _tiny(src / "val", root / "val2", 2),
    }


def _set(folder: Path) -> pr.ImageSet:
    return pr.ImageSet(folder.name, tuple(list_samples(folder)))


# ------------------------------------------------------------------------------------------------ head


def _numpy_objective(theta, z, y, k, l2):
    """Mean cross-entropy + l2/2 ||W||^2 and its gradient, in float64 numpy (written independently)."""
    c = z.shape[1]
    w, b = theta[: k * c].reshape(k, c), theta[k * c :]
    s = z @ w.T + b
    s = s - s.max(axis=1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.log(p[np.arange(n), y]).mean() + 0.5 * l2 * (w * w).sum()
    p[np.arange(n), y] -= 1.0
    gw = p.T @ z / n + l2 * w
    gb = p.sum(axis=0) / n
    return loss, np.concatenate([gw.ravel(), gb])


def test_logistic_head_reaches_the_independent_optimum():
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(0)
    n, c, k, l2 = 90, 7, 4, 3e-3
    z = torch.randn(n, c, generator=g, dtype=torch.float64)
    y = (z[:, :k] * 2 + torch.randn(n, k, generator=g, dtype=torch.float64)).argmax(1)
    w, b = pr.fit_logistic(z, y, k, l2, tol=1e-10, max_iter=2000)
    zn, yn = z.numpy(), y.numpy()
    # 1) stationarity: the gradient of the objective (numpy formula) vanishes at our solution
    loss, grad = _numpy_objective(np.concatenate([w.numpy().ravel(), b.numpy()]), zn, yn, k, l2)
    # L-BFGS stops on its change tolerance near 1e-7 in float64; a stopped-early fit is at 1e-3 or more
    assert np.abs(grad).max() < 1e-6
    # 2) scipy's L-BFGS-B on the numpy objective finds the same point (strictly convex: one minimum)
    ref = minimize(_numpy_objective, np.zeros(k * c + k), args=(zn, yn, k, l2), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000})
    assert abs(ref.fun - loss) < 1e-9
    assert np.abs(ref.x[: k * c].reshape(k, c) - w.numpy()).max() < 1e-4  # set by both solvers' tolerances
    # 3) no nearby point is lower (convexity: a local minimum is the global one)
    for _ in range(5):
        theta = np.concatenate([w.numpy().ravel(), b.numpy()]) + 1e-3 * np.random.default_rng(_).normal(
            size=k * c + k)
        assert _numpy_objective(theta, zn, yn, k, l2)[0] > loss


def test_fit_probe_folds_the_standardization_and_chooses_l2_on_the_holdout_only():
    g = torch.Generator().manual_seed(1)
    n, c, k = 200, 6, 3
    x = torch.randn(n, c, generator=g) * torch.tensor([1.0, 5.0, 0.1, 2.0, 1.0, 3.0]) + 4.0
    y = (x[:, :k] / x[:, :k].std(0) + 1.5 * torch.randn(n, k, generator=g)).argmax(1)
    hold = torch.arange(n) % 4 == 0
    grid = (1.0, 1e-1, 1e-2, 1e-3)
    head = pr.fit_probe(x, y, k, hold, grid)
    # reference: for each l2, fit on the standardized fitting part, score on the held-out part
    fit = ~hold
    mu, sd = x[fit].mean(0), x[fit].std(0)
    acc = {}
    for lam in grid:
        w, b = pr.fit_logistic((x[fit] - mu) / sd, y[fit], k, lam)
        acc[lam] = 100.0 * float((((x[hold] - mu) / sd @ w.T + b).argmax(1) == y[hold]).float().mean())
    assert head.holdout == pytest.approx(acc, abs=1e-9)
    assert acc[head.l2] == max(acc.values())
    # the final head is fitted on all images, on standardized features, and folded onto raw features
    mu, sd = x.mean(0), x.std(0)
    w, b = pr.fit_logistic((x - mu) / sd, y, k, head.l2)
    assert torch.allclose(head.logits(x), (x - mu) / sd @ w.T + b, atol=1e-4)  # float32 refit vs fold
    with pytest.raises(ValueError, match="held-out part"):
        pr.fit_probe(x, y, k, torch.zeros(n, dtype=torch.bool), grid)
    with pytest.raises(ValueError, match="labels must be in"):
        pr.fit_logistic(x, y + 5, k, 1e-2)


# -------------------------------------------------------------------------------------------- features


def test_cached_prefix_features_equal_a_full_pruned_forward(model, cars):
    images = _set(cars["val"])
    tf = ResizeTransform(224)
    x = torch.stack([tf(load_image(s.path)) for s in images.samples])
    configs = [point("renyi", 0.5, 2.0, (3, 6, 9), True), point("evit", 0.7, 1.0, (3, 6, 9)),
               point("diverse", 0.7, 1.0, (4, 7, 10), True), point(None)]
    opts = pr.ProbeConfig(batch_size=len(x), progress=False)
    feats, timing = pr.extract_features(model, configs, [images], tf, opts)
    assert timing["computed"] == len(configs) and timing["images"] == len(x)
    loader = pr._loader([images], tf, len(x), 0)
    cache = sw.build_cache(model, loader, 3, total=len(x), progress=False)
    for ci, c in enumerate(configs):
        full = pr.feature_view(model, c)  # the whole forward from pixels; head: the identity
        with torch.inference_mode():
            ref = full(x)
        if not c.plan.stages:  # the identity head really gives the final-norm CLS token
            with torch.inference_mode():
                assert torch.equal(ref, model.forward_features(x)[:, 0])
        # same batch, same kernels: equal up to float32 reordering inside the library's matmuls
        assert torch.allclose(feats[(ci, 0)], ref, atol=1e-5), c.label
        if not c.plan.stages or min(c.plan.locations) < 3:
            continue
        view = pr.feature_view(model, c)
        sw.run_view(view, cache, batch_size=len(x))
        for got, want in zip(view.renyiprune.records, full.renyiprune.records, strict=True):
            assert torch.equal(got.patch_index, want.patch_index), c.label  # the same tokens kept


def test_prefix_runs_once_per_image_and_images_are_decoded_once(model, cars, images_read, monkeypatch):
    seen, counting = [], []
    block0 = model.blocks[0]
    real = type(block0).forward

    def spy(self, x):
        # block 0 of the model or of any pruned view, outside the GMACs count's one-image forwards
        if self.attn.qkv.weight is block0.attn.qkv.weight and not counting:
            seen.append(x.shape[0])
        return real(self, x)

    real_gmacs = pr.probe_gmacs

    def gmacs(*a, **k):
        counting.append(1)
        try:
            return real_gmacs(*a, **k)
        finally:
            counting.pop()

    monkeypatch.setattr(type(block0), "forward", spy)
    monkeypatch.setattr(pr, "probe_gmacs", gmacs)
    train, evals = _set(cars["train"]), [_set(cars["val"]), _set(cars["val2"])]
    configs = [point("renyi", 0.7, a, (3, 6, 9), True) for a in (1.0, 2.0, float("inf"))]
    configs.append(point("evit", 0.5, 1.0, (3, 6, 9), True))
    tf = ResizeTransform(224)
    records, _ = pr.run_probe(model, configs, train, evals, tf, pr.ProbeConfig(progress=False, batch_size=8))
    total = sum(len(s.samples) for s in [train, *evals])
    assert sum(seen) == total  # blocks[:3] ran once per image, not once per configuration
    assert sorted(images_read) == sorted(str(s.path) for s in [*train.samples, *evals[0].samples,
                                                               *evals[1].samples])
    # every config (plus the unpruned reference and the EViT twin at 0.7) once per evaluation set
    assert len(records) == 2 * (len(configs) + 2)


def test_feature_cache_is_reused_and_keyed(model, cars, images_read, tmp_path):
    train, val = _set(cars["train"]), _set(cars["val"])
    configs = [point("renyi", 0.7, 2.0, (3, 6, 9), True)]
    cache = pr.FeatureCache(tmp_path / "c", {"model": "deit_tiny", "weights": "w1", "transform": "resize"})
    opts = pr.ProbeConfig(cache=cache, progress=False)
    first, t1 = pr.run_probe(model, configs, train, [val], ResizeTransform(224), opts)
    assert t1["computed"] == 6 and t1["cached"] == 0  # 3 configs (renyi, unpruned, EViT) x 2 sets
    files = sorted(f for f in (tmp_path / "c").iterdir() if f.name != LOCK_FILE)  # the writers' lock
    assert len(files) == 6 and all(f.suffix == ".pt" for f in files)  # no temporary file left behind
    images_read.clear()
    again, t2 = pr.run_probe(model, configs, train, [val], ResizeTransform(224), opts)
    assert t2["cached"] == 6 and t2["computed"] == 0 and images_read == []  # nothing decoded
    assert [r["correct"] for r in again] == [r["correct"] for r in first]
    assert [r["top1"] for r in again] == [r["top1"] for r in first]
    # another weights file, another transform, another config: other keys
    other = pr.FeatureCache(tmp_path / "c", {"model": "deit_tiny", "weights": "w2", "transform": "resize"})
    assert other.key(configs[0], val) != cache.key(configs[0], val)
    assert cache.key(point("renyi", 0.7, 3.0, (3, 6, 9), True), val) != cache.key(configs[0], val)
    assert cache.key(configs[0], train) != cache.key(configs[0], val)
    # features written by other pruning code are not found, unless that code's hash is named
    named = pr.FeatureCache(tmp_path / "c", {"model": "deit_tiny", "weights": "w1", "transform": "resize",
                                             "code": cache.context["code"]})
    assert named.key(configs[0], val) == cache.key(configs[0], val)
    elsewhere = pr.FeatureCache(tmp_path / "c", {"model": "deit_tiny", "weights": "w1", "transform": "resize",
                                                 "code": "another"})
    assert elsewhere.load(configs[0], val) is None
    # a corrupt file is recomputed, not trusted
    cache.path(configs[0], val).write_bytes(b"torn")
    assert cache.load(configs[0], val) is None


def test_paired_intervals_match_the_per_image_outcomes(model, cars):
    train, val = _set(cars["train"]), _set(cars["val"])
    configs = [point("renyi", 0.5, 2.0, (3, 6, 9), True)]
    tf, opts = ResizeTransform(224), pr.ProbeConfig(progress=False)
    records, _ = pr.run_probe(model, configs, train, [val], tf, opts)
    by = {r["config"]: r for r in records}
    r, base, evit = by["renyi a=2 r=0.5 +fuse"], by["unpruned"], by["evit r=0.5 +fuse"]
    assert evit["reference"] and base["reference"] and not r["reference"]
    for other, key in ((base, "vs_unpruned"), (evit, "vs_evit")):
        a = np.array([int(ch) for ch in r["correct"]])
        b = np.array([int(ch) for ch in other["correct"]])
        assert r[key]["delta"] == pytest.approx(100.0 * (a - b).mean())
        assert r[key]["a_only"] == int(((a == 1) & (b == 0)).sum())
    assert r["top1"] == pytest.approx(100.0 * np.mean([int(ch) for ch in r["correct"]]))
    assert base["vs_unpruned"] is None and evit["vs_evit"] is None
    assert r["gmacs"] < evit["gmacs"] * 1.01 and r["gmacs"] < base["gmacs"]


def test_evit_twin():
    c = point("renyi", 0.5, 2.0, (3, 6, 9), True, (("direction", "column"), ("removed", "merge")))
    assert pr.evit_twin(c) == point("evit", 0.5, 1.0, (3, 6, 9), True, (("removed", "merge"),))
    staged = point("renyi:2@2+evit@5+evit@8", 0.7, 1.0, (3, 6, 9), False)
    assert pr.evit_twin(staged) == point("evit", 0.7, 1.0, (2, 5, 8), False)
    for c in (point(None), point("tome", options=(("r", 8),)), point("evit", 0.5)):
        assert pr.evit_twin(c) is None


# ------------------------------------------------------------------------------------------------- CLI


def _probe(args, capsys):
    try:
        code = main(["probe", "--weights", str(WEIGHTS), "--no-progress", *args])
    except SystemExit as e:  # argparse rejects a value while parsing (one line, status 2)
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_schema(cars, capsys, tmp_path):
    code, out, err = _probe(["--train", str(cars["train"]), "--eval", str(cars["val"]), str(cars["val2"]),
                             "--criterion", "none,renyi,evit", "--alpha", "1,inf", "--keep", "0.5",
                             "--fuse", "--cache", str(tmp_path / "cache"), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    recs = doc["results"]
    labels = [r["config"] for r in recs if r["eval"] == str(cars["val"])]
    assert labels == ["unpruned", "renyi a=1 r=0.5 +fuse", "renyi a=inf r=0.5 +fuse", "evit r=0.5 +fuse"]
    assert {r["eval"] for r in recs} == {str(cars["val"]), str(cars["val2"])}
    for r in recs:
        for key, typ in (("config", str), ("criterion", str), ("top1", float), ("top5", float),
                         ("images", int), ("gmacs", float), ("l2", float), ("correct", str)):
            assert isinstance(r[key], typ), key
        assert 0.0 <= r["top1"] <= r["top5"] <= 100.0
        assert r["images"] == (12 if r["eval"] == str(cars["val"]) else 8)
    renyi = next(r for r in recs if r["config"] == "renyi a=inf r=0.5 +fuse")
    assert renyi["alpha"] == "inf" and renyi["keep_rate"] == 0.5 and renyi["criterion"] == "renyi"
    assert set(renyi["vs_evit"]) >= {"delta", "ci95", "p_mcnemar"}
    assert doc["train_images"] == 24 and doc["timing"]["cached"] == 0
    # the human table, from the cache this time
    code, out, err = _probe(["--train", str(cars["train"]), "--eval", str(cars["val"]), "--criterion",
                             "renyi", "--alpha", "inf", "--keep", "0.5", "--fuse", "--cache",
                             str(tmp_path / "cache")], capsys)
    assert code == 0, err
    assert "renyi a=inf r=0.5 +fuse" in out and "evit r=0.5 +fuse (ref)" in out and "from the cache" in out


def test_cli_best_with_a_policy_file_is_evals_configuration(tmp_path):
    import argparse

    from renyiprune.cli import build_parser
    from renyiprune.cli import eval as eval_cmd

    policy = {"model": "deit_tiny_patch16_224", "keep": {
        "0.5": {"best": {"criterion": "renyi", "alpha": "inf", "options": {}}, "by_criterion": {}},
        "0.7": {"best": {"criterion": "headvar", "alpha": 1.0, "options": {}}, "by_criterion": {}}}}
    (tmp_path / "p.json").write_text(json.dumps(policy))
    common = ["--criterion", "best", "--policy", str(tmp_path / "p.json"), "--keep", "0.5,0.7", "--fuse"]
    parser = build_parser()
    pa = parser.parse_args(["probe", "--train", "t", "--eval", "e", *common])
    ea = parser.parse_args(["eval", "--data", str(tmp_path), *common])
    assert isinstance(pa, argparse.Namespace)
    got = eval_cmd.configs_from_args(pa)
    assert got == eval_cmd.configs_from_args(ea)
    assert got == [point("renyi", 0.5, float("inf"), (3, 6, 9), True),
                   point("headvar", 0.7, 1.0, (3, 6, 9), True)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--criterion", "nonsense"], "unknown criterion"),
        (["--l2", "0"], "--l2: invalid number '0': must be a finite number > 0"),
        (["--limit", "0"], "--limit: invalid integer '0': must be >= 1"),
        (["--dataset", "stanford-cars"], "needs --data-root"),
        (["--locations", "3,6,12"], "out of range"),
    ],
)
def test_cli_bad_input_is_one_line_and_decodes_nothing(cars, capsys, images_read, extra, message):
    code, _, err = _probe(["--train", str(cars["train"]), "--eval", str(cars["val"]), *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert images_read == []


def test_cli_missing_folder(cars, capsys, tmp_path):
    code, _, err = _probe(["--train", str(cars["train"]), "--eval", str(tmp_path / "nope")], capsys)
    assert code == 2 and "nope" in err


def test_unpruned_head_runs_train_unpruned_only_and_classifies_pruned_features(model, cars, tmp_path):
    train, val = _set(cars["train"]), _set(cars["val"])
    configs = [point("renyi", 0.5, float("inf"), (3, 6, 9), True)]
    cache = pr.FeatureCache(tmp_path / "c", {"model": "deit_tiny", "weights": "w", "transform": "resize"})
    tf = ResizeTransform(224)
    shared, t = pr.run_probe(model, configs, train, [val], tf,
                             pr.ProbeConfig(cache=cache, progress=False, head="unpruned"))  # fmt: skip
    assert t["computed"] == 1 + 3  # train: the unpruned model only; val: renyi, unpruned, EViT
    assert {r["head"] for r in shared} == {"unpruned"} and len({r["l2"] for r in shared}) == 1
    # independent: fit the head on the cached unpruned train features, apply it to the cached renyi ones
    y = train.labels
    hold = torch.tensor([pr.is_holdout(s.path) for s in train.samples])
    head = pr.fit_probe(cache.load(point(None), train), y, 4, hold)
    pred = head.logits(cache.load(configs[0], val)).argmax(1)
    want = "".join("1" if p == t else "0" for p, t in zip(pred.tolist(), val.labels.tolist(), strict=True))
    assert shared[0]["correct"] == want
    # the unpruned record is the same under both protocols (its own features train the head either way)
    own, _ = pr.run_probe(model, configs, train, [val], tf, pr.ProbeConfig(cache=cache, progress=False))
    assert own[1]["config"] == shared[1]["config"] == "unpruned" and own[1]["correct"] == shared[1]["correct"]
    with pytest.raises(ValueError, match="head must be"):
        pr.ProbeConfig(cache=cache, progress=False, head="both")


def test_feature_cache_key_covers_the_pruning_code(monkeypatch):
    """The cache key hashes the code that computes pruned features: the files exist where the key looks
    (a moved module must not drop out of it) and an edit to one of them gives another key."""
    from renyiprune.experiments import probe_cache as probe

    pkg = Path(probe.__file__).resolve().parents[1]
    names = {f.relative_to(pkg).as_posix() for f in probe.feature_code_files()}
    assert {"core/criteria.py", "core/selection.py", "core/streamed.py", "core/blocks.py", "core/entropy.py",
            "core/attention.py", "models/model.py"} <= names  # fmt: skip
    before = probe._code_hash()
    read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read(self) + (b"#" * (self.name == "selection.py")))
    assert probe._code_hash() != before
    monkeypatch.setattr(probe, "_FEATURE_CODE", (*probe._FEATURE_CODE, "core/moved_away.py"))
    with pytest.raises(RuntimeError, match="moved_away"):
        probe.feature_code_files()
