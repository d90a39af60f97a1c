#!/usr/bin/env bash
# Nsight Compute profile of one node_attention forward launch at N atoms (GPU machine only):
#   bash benchmarks/profile_attention.sh OUT_DIR [N] [BLOCKS]
# Writes OUT_DIR/attention_fwd.ncu-rep (the full report), details.txt (every section: speed of light,
# memory workload, occupancy, warp stall reasons, launch statistics) and sass.csv (each SASS
# instruction with its execution and stall counts), which answer: are the gathers 16-byte loads,
# how many integer/address instructions accompany each FMA, what do warps wait on. Then
# kernel_times.csv: the duration of every kernel of one forward and one forward+backward call.
set -euo pipefail
OUT_DIR="${1:?usage: profile_attention.sh OUT_DIR [N] [BLOCKS h,k,n,warps,stages]}"
N="${2:-100000}"
BLOCKS="${3:-}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
PROFILED=(python3 benchmarks/attention.py --phases profile --sizes "$N" ${BLOCKS:+--blocks "$BLOCKS"}
          --out /tmp/attention_profile.json)
ncu --set full --import-source no -k regex:"_forward_kernel|node_attention" --launch-count 1 -f \
    -o "$OUT_DIR/attention_fwd" "${PROFILED[@]}"
ncu -i "$OUT_DIR/attention_fwd.ncu-rep" --page details > "$OUT_DIR/details.txt"
ncu -i "$OUT_DIR/attention_fwd.ncu-rep" --page source --print-source sass --csv > "$OUT_DIR/sass.csv"
# Time of every kernel of one forward and one forward+backward call (the backward's breakdown).
ncu --metrics gpu__time_duration.sum --csv "${PROFILED[@]}" > "$OUT_DIR/kernel_times.csv"
