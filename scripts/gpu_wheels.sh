#!/usr/bin/env bash
# Fetch, here (where PyPI answers), the wheels a GPU machine's image lacks for the GPU checks:
# its python3 (3.12) has torch, triton, onnx, onnxruntime, safetensors, transformers, numpy, psutil,
# scikit-learn, pytest and pytest-timeout (device KINDS.md, 2026-11-17); the engine also needs these. They land in .whl/ (git-ignored), which
# scripts/gpu_check.sh installs from. The versions are the ones this project's venv resolved.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
  typing-inspection==0.4.5 python-dotenv==1.2.4 obstore==0.12.1 cut-cross-entropy==25.1.1 \
  liger_kernel==0.8.5
du -sh .whl
