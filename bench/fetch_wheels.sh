#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels a bare GPU machine with torch, transformers and accelerate
# lacks for bench/gpu.py: diffusers and the peft we test against. Installed there with --no-deps: diffusers'
# importlib_metadata is for Python < 3.8 only (and version 10 imports lazy_importer, which that machine lacks).
# Run here (with network), then run bench/gpu_device.sh there with .whl carried along.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "diffusers==0.42.1" "peft==0.21.2"
ls -la .whl
