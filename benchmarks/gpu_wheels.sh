#!/usr/bin/env bash
# Wheels that benchmarks/gpu_vs_peft.py needs on a GPU machine with no network whose image
# already has torch, triton, accelerate, tokenizers, huggingface-hub, safetensors, typer,
# rich, pyyaml and jinja2 (Python 3.12): the versions vitune is tested with, Liger, pydantic.
# Run from the repository root; the wheels land in .whl/ (git-ignored via .git/info/exclude).
#
# Then, on the GPU machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
#   PYTHONUNBUFFERED=1 python3 benchmarks/gpu_vs_peft.py --out "$OUT/gpu_vs_peft.json"
set -euo pipefail
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    transformers==5.24.0 peft==0.21.2 liger-kernel==0.8.5 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
du -sh .whl
