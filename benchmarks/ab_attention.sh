#!/usr/bin/env bash
# Same-machine A/B of the attention benchmark: a base tree against one or more others, alternating,
# in one device call (run-to-run differences between machines exceed most changes; notes_attention.md).
#   git archive BASE_REV | tar -x -C runs/base       # here, and one folder per other tree to compare;
#                                                     # then carry them to the GPU machine
#   bash benchmarks/ab_attention.sh runs/base OUT_DIR [SIZES] [IMPLS] [REPEATS] [TREE ...]
# TREEs default to this checkout (.). AB_XLA_FLAGS: XLA_FLAGS for the compared trees only (with
# BASE_DIR=. it A/Bs a compiler switch). AB_ARGS: more arguments for benchmarks/attention.py (e.g.
# --interpret for a CPU dry run). Prints one line per (tree, repeat, size, implementation) with the
# times in ms; each run's JSON goes to OUT_DIR/{base,TREE's folder name}_REPEAT.json.
set -uo pipefail
BASE_DIR="$(cd "${1:?usage: ab_attention.sh BASE_DIR OUT_DIR [SIZES] [IMPLS] [REPEATS]}" && pwd)"
OUT_DIR="$(mkdir -p "${2:?OUT_DIR}" && cd "$2" && pwd)"
SIZES="${3:-10000,100000}"
IMPLS="${4:-message}"
REPEATS="${5:-2}"
TREES=("${@:6}")
[ ${#TREES[@]} -eq 0 ] && TREES=(.)
export PYTHONUNBUFFERED=1

side() {  # name, tree, repeat, XLA_FLAGS
  (cd "$2" && XLA_FLAGS="$4" python3 benchmarks/attention.py --phases bench --sizes "$SIZES" \
     --impls "$IMPLS" --commit "$1" --out "$OUT_DIR/$1_$3.json" --results-md /dev/null \
     ${AB_ARGS:-} > "$OUT_DIR/$1_$3.log" 2>&1)
  python3 - "$1" "$3" "$OUT_DIR/$1_$3.log" <<'EOF'
import json, sys
name, repeat, log = sys.argv[1:]
rows = [json.loads(line[len("bench "):]) for line in open(log) if line.startswith("bench ")]
if not rows:
  print(name, repeat, "no result:", open(log).read()[-600:])
for row in rows:
  times = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k.endswith("_ms")}
  print(name, repeat, row["num_atoms"], row["impl"], times or row.get("error", "")[-300:])
EOF
}

for i in $(seq "$REPEATS"); do
  side base "$BASE_DIR" "$i" "${XLA_FLAGS:-}"
  for tree in "${TREES[@]}"; do
    tree="$(cd "$tree" && pwd)"
    side "$( [ "$tree" = "$PWD" ] && echo this || basename "$tree")" "$tree" "$i" \
      "${AB_XLA_FLAGS:-${XLA_FLAGS:-}}"
  done
done
