"""The Oxford Flowers-102 probe sweep: ``cars_probe_sweep`` on the official splits (head fitted on
``train`` = ``trnid``, scored on ``val`` = ``valid``), the model's centre-crop transform, and Rényi's
readings (docs/method.md) with ``--readings``; α, criterion and reading are chosen per keep rate on the
calibration half of ``val``.

    python benchmarks/flowers_probe_sweep.py --data-root FLOWERS --cache C --out O [--readings first]
    python benchmarks/flowers_probe_sweep.py --data-root FLOWERS --cache C --out O --report \\
        --policy-out src/renyiprune/planning/policies/deit_tiny_patch16_224-flowers102.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cars_probe_sweep  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--dataset" not in argv:
        argv += ["--dataset", "flowers102"]
    cars_probe_sweep.main(argv, dataset="flowers102", transform="center-crop")
