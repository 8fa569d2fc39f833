"""ONNX export of a pruned model: onnxruntime's outputs equal torch's, for several batch sizes."""

import pytest
import torch
from tolerances import vit_rtol

import renyiprune as rp
from renyiprune.models.model import VisionTransformer

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (renyiprune[export])")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (renyiprune[export])")

from renyiprune.models.export import export_onnx, onnx_max_difference  # noqa: E402

pytestmark = pytest.mark.numerics
#: onnxruntime's kernels against torch's on the 4-block, width-32, 2-head model (tests/tolerances.py).
RTOL = vit_rtol(torch.float32, depth=4, dim=32, heads=2, tokens=17)


def agrees_with_torch(path, model, x) -> bool:
    """onnxruntime's output within RTOL x max|torch output| of torch's, in every element."""
    with torch.no_grad():
        scale = model(x).abs().max().item()
    return onnx_max_difference(path, model, x) <= RTOL * scale


def test_pruned_tiny_model_exports_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    crits = ["renyi", "evit"]
    rp.patch(m.eval(), keep_rate=(0.6, 0.5), criterion=crits, alpha=2.0, locations=(1, 2), fuse=True)
    path = export_onnx(m, tmp_path / "tiny.onnx", image_size=32)
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    for batch in (1, 3):
        assert agrees_with_torch(path, m, torch.randn(batch, 3, 32, 32))


def test_failed_export_leaves_no_file(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    target = tmp_path / "broken.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(Exception, match="boom"):
        export_onnx(Broken(), target, image_size=8)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]  # no temporary file left


@pytest.mark.parametrize("criterion", ["cls_value", "pagerank", "evit_renyi", "diverse"])
def test_criteria_that_read_keys_and_values_export(tmp_path, criterion):
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    rp.patch(m.eval(), keep_rate=0.5, criterion=criterion, locations=(1, 2), fuse=True)
    path = export_onnx(m, tmp_path / "tiny.onnx", image_size=32)
    assert agrees_with_torch(path, m, torch.randn(2, 3, 32, 32))


def test_cli_exports_the_tuned_policy(shared_assets, tmp_path, capsys):
    from renyiprune.cli import main

    w = shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"
    out = tmp_path / "best.onnx"
    argv = ["export", "--weights", str(w), "--criterion", "best", "--keep", "0.7", "--fuse",
            "--onnx", str(out), "--check"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    best = rp.planning.policy.resolve_best(0.7)[0]
    assert out.is_file() and f"{best}@3:0.7" in text and "max |diff|" in text
