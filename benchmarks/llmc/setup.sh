#!/usr/bin/env bash
# Create the separate venv that runs llm-compressor (the side-by-side anchor).
#
# llm-compressor 0.14 pins transformers<=5.17 and torch<=2.14, so it cannot
# share the hf_prune venv. torch is installed FIRST and then held by a
# constraints file, so that resolving llmcompressor neither replaces the CPU
# wheel nor pulls gigabytes of CUDA packages.
#
# Usage: bash benchmarks/llmc/setup.sh [VENV_DIR]
#   VENV_DIR defaults to $LLMC_VENV or <repo>/.bench/llmc-venv (git-ignored).
#   PYTHON (default python3) creates the venv; LLMC_WHEELS is an extra wheel
#   directory searched for the torch CPU wheel (besides /opt/wheels).
# Idempotent: exits at once when the venv already has torch==2.13.0 and llmcompressor.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${1:-${LLMC_VENV:-$REPO/.bench/llmc-venv}}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${LLMC_TORCH_VERSION:-2.13.0}"
LLMC_SPEC="${LLMC_SPEC:-llmcompressor==0.14.0.1}"

check_venv() {
    # Package metadata only: importing llmcompressor takes ~10 s.
    "$VENV/bin/python" - "$TORCH_VERSION" <<'PY'
import sys
from importlib.metadata import version
assert version("torch").split("+")[0] == sys.argv[1], version("torch")
print("torch", version("torch"), "| transformers", version("transformers"),
      "| llmcompressor", version("llmcompressor"))
PY
}

if [ -x "$VENV/bin/python" ] && check_venv >/dev/null 2>&1; then
    echo "llm-compressor venv already set up: $VENV"
    exit 0
fi

echo "creating llm-compressor venv in $VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# Everything resolved after torch is constrained to the torch installed first.
CONSTRAINTS="$VENV/llmc-constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

# 1. torch first. The CPU wheel is found through find-links (/opt/wheels on the
#    project machines, or $LLMC_WHEELS); without one pip uses its configured index.
FIND_LINKS=()
for d in "${LLMC_WHEELS:-}" /opt/wheels; do
    if [ -n "$d" ] && [ -d "$d" ]; then FIND_LINKS+=(--find-links "$d"); fi
done
"${PIP[@]}" install "${FIND_LINKS[@]}" "torch==$TORCH_VERSION"

# 2. llm-compressor with torch held (fall back to 0.14.0 if 0.14.0.1 is unavailable).
if ! "${PIP[@]}" install "${FIND_LINKS[@]}" -c "$CONSTRAINTS" "$LLMC_SPEC"; then
    "${PIP[@]}" install "${FIND_LINKS[@]}" -c "$CONSTRAINTS" "llmcompressor==0.14.0"
fi

check_venv
echo "llm-compressor venv ready: $VENV"
