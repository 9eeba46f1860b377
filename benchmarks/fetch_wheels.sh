#!/usr/bin/env bash
# Download the pinned versions (requirements.txt) of the libraries a GPU machine's preinstalled Python lacks or has
# at another version, as wheels for that machine (Python 3.12, x86-64), into .whl/ at the repository root.
# Carry .whl to the machine and install it ahead of what is there, then check the result:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 scripts/check_env.py     # torch stays the machine's own build: that line is expected
#
#   benchmarks/fetch_wheels.sh                  # the default set below
#   benchmarks/fetch_wheels.sh peft av          # these packages instead (at their pinned versions)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
# transformers and what it needs at the pinned versions; the rest of the image (torch, numpy, ...) is used as is.
PACKAGES=("$@")
if [ "${#PACKAGES[@]}" -eq 0 ]; then
    PACKAGES=(transformers tokenizers accelerate peft safetensors huggingface_hub hf-xet httpx2 httpcore2 datasets)
fi

pins=()
for name in "${PACKAGES[@]}"; do
    pin=$(grep -i -E "^${name//[-_]/[-_]}==" "$ROOT/requirements.txt" || true)
    if [ -z "$pin" ]; then echo "fetch_wheels.sh: $name is not pinned in requirements.txt" >&2; exit 2; fi
    pins+=("$pin")
done
mkdir -p "$ROOT/.whl"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$ROOT/.whl" "${pins[@]}"
du -sh "$ROOT/.whl"
