#!/usr/bin/env bash
# The checks that need a CUDA GPU, where one exists: the tests marked `cuda` (which skip without
# one), a short end-to-end run with workers on the GPU, and the worker-step benchmark on the GPU.
#
#     scripts/gpu_check.sh            # from the repository root, on a machine with CUDA
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (torch.version.cuda={torch.version.cuda})")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
python -m pytest -q -m cuda -rs tests/
python scripts/bench_worker_step.py --device cuda --repeats 50 --threads 4
