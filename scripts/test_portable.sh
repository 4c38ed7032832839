#!/usr/bin/env bash
# `make test-portable`: re-execute every notebook with nbval (strict, the committed sanitize
# file) under emulated machines, and check that every figure they draw is byte-identical to the
# committed one in figures/.
#
# A CPU changes float32 results through ATen's vectorised kernels (scalar / AVX2 / AVX-512
# paths, chosen by ATEN_CPU_CAPABILITY) and MKL's code paths (MKL_ENABLE_INSTRUCTIONS,
# MKL_CBWR). Each setting must be in the environment before torch starts; the notebook kernel
# inherits it from pytest. Usage:
#     scripts/test_portable.sh [notebooks/NN_x.ipynb ...]      (default: every notebook)
# PORTABLE_MACHINES (newline-separated env assignments) overrides the machine list; an empty
# line is the unmodified machine. PORTABLE_JOBS machines run at once (default 2: notebooks use
# one thread each, so two runs share a 2-core machine without slowing each other much).
# PORTABLE_PYTEST_ARGS adds pytest arguments (e.g. "-n 2 --dist loadfile" for one machine).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=${PYTEST:-$PWD/.venv/bin/pytest}
# The four machines of issue 13, then ATen scalar + MKL CBWR together (the combination CI runs).
DEFAULT_MACHINES=$'\nATEN_CPU_CAPABILITY=default\nATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2\nMKL_CBWR=COMPATIBLE\nATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE'
MACHINES=${PORTABLE_MACHINES-$DEFAULT_MACHINES}
JOBS=${PORTABLE_JOBS:-2}
if [ $# -gt 0 ]; then NOTEBOOKS=("$@"); else NOTEBOOKS=(notebooks/*.ipynb); fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

run_machine() {  # index, env assignments: nbval, then compare the figures it wrote
  local i=$1 machine=$2 label=${2:-"(this machine, unmodified)"} start status=0
  start=$(date +%s)
  mkdir -p "$WORK/$i/figures"
  # shellcheck disable=SC2086  # word splitting of the assignments is intended
  env $machine DSV3_FIGURES_DIR="$WORK/$i/figures" "$PYTEST" -q -p no:cacheprovider --nbval \
      --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg -o addopts="" \
      --no-loadscope-reorder \
      ${PORTABLE_PYTEST_ARGS:-} "${NOTEBOOKS[@]}" > "$WORK/$i/log" 2>&1 || status=1
  for fig in "$WORK/$i/figures"/*.png; do
    [ -e "$fig" ] || continue
    if ! cmp -s "$fig" "figures/$(basename "$fig")"; then
      echo "figure differs from the committed one: figures/$(basename "$fig")" >> "$WORK/$i/log"
      status=1
    fi
  done
  echo "$label | $(( $(date +%s) - start )) s | $([ $status = 0 ] && echo passed || echo FAILED)" \
      > "$WORK/$i/result"
  return $status
}

i=0
while IFS= read -r machine; do
  i=$((i + 1))
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  echo "== starting machine $i: ${machine:-"(this machine, unmodified)"}"
  run_machine "$i" "$machine" &
done <<< "$MACHINES"
wait

failed=0
for dir in "$WORK"/*/; do
  echo "== $(cat "$dir/result")"
  tail -n 25 "$dir/log"
  grep -q "| passed$" "$dir/result" || failed=1
done
if [ $failed = 1 ]; then
  echo "NOT PORTABLE: see the failing machines above"
  exit 1
fi
echo "portable: every notebook passed strict nbval under every machine; figures byte-identical"
