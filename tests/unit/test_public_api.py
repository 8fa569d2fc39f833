"""``import renyiprune`` exports 15 names and binds no other public name; the rest imports from its module."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import renyiprune as rp
from renyiprune.core.plans import Stage
from renyiprune.models.model import VisionTransformer
from renyiprune.planning.policy import POLICY_DIR

PUBLIC = {
    "create_model", "prune", "merge", "unpatch", "patch", "PrunePlan", "MergePlan", "plan_for_budget",
    "register_criterion", "list_criteria", "list_models", "load_policy", "records", "UnsupportedModelError",
    "WeightsError",
}  # fmt: skip
#: Names the package exported before the API was cut, and the module each is imported from now.
DROPPED = {
    "CRITERIA": "renyiprune.core.criteria", "make_criterion": "renyiprune.core.criteria",
    "MERGE_ORDERS": "renyiprune.core.merge_order", "list_merge_orders": "renyiprune.core.merge_order",
    "register_merge_order": "renyiprune.core.merge_order", "MODELS": "renyiprune.models.model",
    "VisionTransformer": "renyiprune.models.model", "register_model": "renyiprune.models.model",
    "AttentionContext": "renyiprune.core.attention", "Needs": "renyiprune.core.attention",
    "PruneState": "renyiprune.core.state", "is_patched": "renyiprune.core.state",
    "Stage": "renyiprune.core.plans",
    "apply": "renyiprune.core.api", "share_parameters": "renyiprune.core.api",
    "keep_count": "renyiprune.core.selection", "renyi_entropy": "renyiprune.core.entropy",
    "count_gmacs": "renyiprune.planning.flops", "policy": "renyiprune.planning",
}  # fmt: skip


def _fresh(code: str) -> str:
    """stdout of ``code`` run in a new interpreter (nothing imported before ``import renyiprune``)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_all_is_the_fifteen_names_and_each_is_bound():
    assert set(rp.__all__) == PUBLIC and len(rp.__all__) == len(PUBLIC) <= 15
    assert all(hasattr(rp, name) for name in rp.__all__)


def test_a_fresh_import_binds_no_other_public_name_and_registers_the_hosts():
    code = (
        "import json, types, renyiprune as rp\n"
        "from renyiprune.core.hosts import HOSTS\n"
        "names = [n for n, v in vars(rp).items()\n"
        "         if not n.startswith('_') and not isinstance(v, types.ModuleType)]\n"
        "print(json.dumps({'names': sorted(names), 'hosts': [h.name for h in HOSTS]}))\n"
    )
    out = json.loads(_fresh(code))
    assert set(out["names"]) == PUBLIC
    assert {"transformers", "timm"} <= set(out["hosts"])


@pytest.mark.parametrize("name", sorted(DROPPED))
def test_a_dropped_name_is_not_an_attribute_but_imports_from_its_module(name):
    assert not hasattr(rp, name)
    assert hasattr(importlib.import_module(DROPPED[name]), name)


def _tiny() -> VisionTransformer:
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=3)
    return m.eval()


def test_records_are_the_last_forwards_per_stage_records():
    m = _tiny()
    with pytest.raises(ValueError, match="VisionTransformer is not patched by renyiprune"):
        rp.records(m)
    stages = (Stage(1, keep_rate=0.5, criterion="evit"), Stage(2, tokens=3, criterion="renyi"))
    rp.prune(m, rp.PrunePlan(stages))
    assert rp.records(m) == []  # no forward yet
    with torch.no_grad():
        m(torch.randn(2, 3, 32, 32))
    first, second = rp.records(m)
    assert (first.location, second.location) == (1, 2)
    assert first.kept.shape == (2, 8) and second.kept.shape == (2, 3)  # ceil(0.5 * 16), then 3 of those 8
    rp.records(m).clear()  # a copy: the model's own records stay
    assert len(m.renyiprune.records) == 2
    rp.merge(m, rp.MergePlan(r=2))
    with torch.no_grad():
        m(torch.randn(1, 3, 32, 32))
    assert rp.records(m) == []  # ToMe merges after every block and ranks no patches
    with pytest.raises(ValueError, match="not patched"):
        rp.records(rp.unpatch(m))


def test_load_policy_reads_a_shipped_policy_by_name_or_a_file_by_path(tmp_path, monkeypatch):
    shipped = POLICY_DIR / "deit_tiny_patch16_224-flowers102.json"
    by_name = rp.load_policy("deit_tiny_patch16_224-flowers102")
    assert by_name == json.loads(shipped.read_text(encoding="utf-8")) == rp.load_policy(shipped)
    assert rp.load_policy() == rp.load_policy("deit_tiny_patch16_224") != by_name
    with pytest.raises(FileNotFoundError, match=r"shipped: deit_tiny_patch16_224, "):
        rp.load_policy("deit_small_patch16_224")
    # A file of that name in the working folder is read first: a path wins over a shipped name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deit_tiny_patch16_224").write_text(shipped.read_text(encoding="utf-8"), encoding="utf-8")
    assert rp.load_policy("deit_tiny_patch16_224") == by_name


def test_every_public_name_has_an_example_in_docs_api():
    """Each of the 15 names is called or used in a python block of docs/api.md (executed by test_docs)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text(encoding="utf-8")
    code = "\n".join(re.findall(r"^```python[ \t]*\n(.*?)^```", text, flags=re.S | re.M))
    assert [n for n in sorted(PUBLIC) if not re.search(rf"\brp\.{n}\b", code)] == []
