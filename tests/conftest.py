"""Shared pytest fixtures, and one folder of inductor caches per CPU capability."""

import os
from pathlib import Path

import pytest
import torch


def _inductor_cache_per_capability() -> None:
    """Give torch.compile one cache folder per ATEN_CPU_CAPABILITY.

    Inductor's graph cache key leaves out the capability (torch 2.13): a graph generated as AVX-512 code
    and reused under ATEN_CPU_CAPABILITY=default fails to build ("'at::vec' has not been declared"), and
    under =avx2 it built and returned NaN. A folder named after the capability keeps the runs apart; a
    folder the user chose (TORCHINDUCTOR_CACHE_DIR) is left alone."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch layout: keep torch's own default
        return
    capability = torch.backends.cpu.get_cpu_capability().lower()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_{capability}"


_inductor_cache_per_capability()

#: ``../shared/assets`` relative to the repository root: real images and weights used by the tests.
SHARED_ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    """Path of ``../shared/assets``; skips the test with a clear reason when that folder is absent."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"../shared/assets not found: expected real test assets at {SHARED_ASSETS}")
    return SHARED_ASSETS


@pytest.fixture
def images_read(monkeypatch) -> list[str]:
    """Paths of every image the code under test opens (``renyiprune.data.load_image`` spied on)."""
    from renyiprune.data import images as data

    read: list[str] = []
    real = data.load_image

    def spy(path):
        read.append(str(path))
        return real(path)

    monkeypatch.setattr(data, "load_image", spy)
    return read


#: Test modules that run the real model over many images, real launchers (torchrun, subprocesses that
#: train), torch.compile, ONNX export or fine-tuning. They carry the ``heavy`` marker: ``make test``
#: leaves them out so that it finishes in a few minutes on 2 cores; ``make test-all`` (and CI) runs them.
HEAVY_MODULES = frozenset({
    "test_benchmark", "test_cars_finetune", "test_flowers_finetune", "test_hf_host", "test_linear_probe",
    "test_onnx_export", "test_real_model", "test_reduced_precision", "test_torch_compile", "test_torchrun",
    "test_training", "test_training_bookkeeping", "test_output_locks", "test_sweep_keys_and_lock",
    "test_cli_datasets", "test_visualize",
})  # fmt: skip
#: Single tests elsewhere that launch torchrun.
HEAVY_TESTS = frozenset({"test_eval_under_torchrun_shards_and_adds_up"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in HEAVY_MODULES or item.originalname in HEAVY_TESTS:
            item.add_marker(pytest.mark.heavy)


@pytest.fixture(scope="session")
def bf16_attention() -> None:
    """Skip when torch cannot run bfloat16 attention on this CPU at the selected ATen capability: its
    fused CPU attention kernel packs bfloat16 with AVX-512 instructions, and with
    ATEN_CPU_CAPABILITY=default on an AVX-512 CPU it raises "pack_vnni2 is only supported when avx512 is
    supported" (torch 2.13). The same tests run unskipped at the CPU's own capability."""
    q = torch.randn(2, 3, 197, 64, dtype=torch.bfloat16)  # DeiT-Tiny's attention shape
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as e:
        capability = os.environ.get("ATEN_CPU_CAPABILITY", "the CPU's own")
        pytest.skip(f"torch cannot run bfloat16 attention here (ATEN_CPU_CAPABILITY={capability}): {e}")
