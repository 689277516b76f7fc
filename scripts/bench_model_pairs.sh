#!/usr/bin/env bash
# Interleaved candle/PyTorch pairs of the model benchmark, for ratios on a shared machine:
# CPU time there moves with whatever shares the host, so each candle run is compared with the
# torch run next to it, and the summary gives min / median / max of the per-pair ratios and the
# ratio of the two sides' medians over the run.
#
#   scripts/bench_model_pairs.sh [PAIRS] [OUT_DIR]     (defaults: 10, a temporary directory)
#
# PIPELINE is the binary (default: target/release/pipeline), PYTHON an interpreter with torch,
# transformers and peft (default: python3). One thread on both sides unless RAYON_NUM_THREADS
# says otherwise. Process CPU time is compared.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
pairs="${1:-10}"
out="${2:-$(mktemp -d -t bench_pairs.XXXXXX)}"
bin="${PIPELINE:-$root/target/release/pipeline}"
py="${PYTHON:-python3}"
model="$root/stages/tests/fixtures/llava-tiny"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}"
[[ -x "$bin" ]] || { echo "bench_model_pairs.sh: no binary at $bin (cargo build --release)" >&2; exit 2; }
"$py" -c "import torch, transformers, peft" 2>/dev/null ||
    { echo "bench_model_pairs.sh: $py lacks torch, transformers or peft" >&2; exit 2; }
mkdir -p "$out"
for i in $(seq 1 "$pairs"); do
    echo "pair $i/$pairs $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)" >&2
    "$bin" model bench --model "$model" --steps 5 > "$out/candle-$i.json"
    "$py" "$root/scripts/bench_model.py" --model "$model" --steps 5 --json-out "$out/torch-$i.json" > /dev/null 2> "$out/torch-$i.log" ||
        { echo "bench_model_pairs.sh: torch run $i failed, see $out/torch-$i.log" >&2; exit 1; }
done
"$py" - "$out" "$pairs" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
# (key, True when larger is better)
keys = [("forward_ms", False), ("lora_step_ms", False), ("full_step_ms", False),
        ("generate_tok_s_b1", True), ("generate_tok_s_b16", True)]
pairs = [(json.load(open(f"{out}/candle-{i}.json"))["cpu"], json.load(open(f"{out}/torch-{i}.json"))["cpu"])
         for i in range(1, n + 1)]
print(f"{n} pairs, process CPU time, candle advantage per pair (JSON in {out})")
print("| metric | candle | torch | min / median / max | ratio of medians | pairs >= 1x | pairs >= 2x |")
print("|---|---|---|---|---|---:|---:|")
for k, up in keys:
    c = [p[0][k] for p in pairs]
    t = [p[1][k] for p in pairs]
    r = [a / b if up else b / a for a, b in zip(c, t)]
    # Each side's median over the run: less at the mercy of one slow moment than a pair.
    mc, mt = statistics.median(c), statistics.median(t)
    print(f"| {k} | {min(c):.0f}-{max(c):.0f} | {min(t):.0f}-{max(t):.0f} | "
          f"{min(r):.2f}x / {statistics.median(r):.2f}x / {max(r):.2f}x | "
          f"{(mc / mt if up else mt / mc):.2f}x | "
          f"{sum(x >= 1 for x in r)} | {sum(x >= 2 for x in r)} |")
PY
