#!/usr/bin/env bash
# Side-by-side model benchmark: candle (`cargo bench -p stages --bench model`) vs PyTorch +
# transformers (scripts/bench_model.py) on the same shapes.
#
#   scripts/bench_model.sh [--model DIR] [--batch B] [--text-len T] [--lora-rank R] [--steps N] [--new-tokens G]
#
# PYTHON selects the interpreter (default: python3); without torch the candle column alone
# is printed. Threads: RAYON_NUM_THREADS (default 1 on both sides).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model="$root/stages/tests/fixtures/llava-tiny"
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --batch|--text-len|--lora-rank|--steps|--new-tokens) args+=("$1" "$2"); shift 2 ;;
    *) echo "bench_model.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}"
out="$(mktemp -t bench_model.XXXXXX.json)"
trap 'rm -f "$out"' EXIT
(cd "$root" && cargo bench -q -p stages --bench model -- --model "$model" "${args[@]}") > "$out"
"${PYTHON:-python3}" "$root/scripts/bench_model.py" --model "$model" "${args[@]}" --rust-json "$out"
