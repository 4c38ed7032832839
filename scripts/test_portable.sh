#!/usr/bin/env bash
# `make test-portable`: re-execute every notebook with nbval (strict, the committed sanitize
# file) under emulated machines, and check that the figures they rewrite stay byte-identical.
#
# A CPU changes float32 results through ATen's vectorised kernels (scalar / AVX2 / AVX-512
# paths, chosen by ATEN_CPU_CAPABILITY) and MKL's code paths (MKL_ENABLE_INSTRUCTIONS,
# MKL_CBWR). Each setting must be in the environment before torch starts; the notebook kernel
# inherits it from pytest. Usage:
#     scripts/test_portable.sh [notebooks/NN_x.ipynb ...]      (default: every notebook)
# PORTABLE_MACHINES (newline-separated env assignments) overrides the machine list; an empty
# line is the unmodified machine.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=${PYTEST:-.venv/bin/pytest}
DEFAULT_MACHINES=$'\nATEN_CPU_CAPABILITY=default\nATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2\nMKL_CBWR=COMPATIBLE'
MACHINES=${PORTABLE_MACHINES-$DEFAULT_MACHINES}
if [ $# -gt 0 ]; then NOTEBOOKS=("$@"); else NOTEBOOKS=(notebooks/*.ipynb); fi

in_git=0
git rev-parse --is-inside-work-tree >/dev/null 2>&1 && in_git=1
before=""
[ $in_git = 1 ] && before=$(git status --porcelain -- figures/)

failed=()
while IFS= read -r machine; do
  label=${machine:-"(this machine, unmodified)"}
  echo "== machine: $label =="
  start=$(date +%s)
  # shellcheck disable=SC2086  # word splitting of the assignments is intended
  if ! env $machine "$PYTEST" -q -p no:cacheprovider --nbval --nbval-current-env \
      --nbval-sanitize-with tests/nbval_sanitize.cfg -o addopts="" "${NOTEBOOKS[@]}"; then
    failed+=("$label: nbval")
  fi
  if [ $in_git = 1 ] && [ "$(git status --porcelain -- figures/)" != "$before" ]; then
    echo "figures changed under $label:"; git status --porcelain -- figures/
    failed+=("$label: figures differ")
  fi
  echo "== $label: $(( $(date +%s) - start )) s =="
done <<< "$MACHINES"

if [ ${#failed[@]} -gt 0 ]; then
  printf 'NOT PORTABLE: %s\n' "${failed[@]}"
  exit 1
fi
echo "portable: every notebook passed strict nbval under every machine; figures unchanged"
