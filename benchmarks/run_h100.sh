#!/usr/bin/env bash
# Every H100 measurement of this repository, as steps of one or more device calls (the `device` tool of
# this workplace; one call runs at most 10 minutes, so pick a few steps per call):
#   STEPS="train attention torch md" bash benchmarks/run_h100.sh OUT_DIR
#   STEPS="torch_large md_large" bash benchmarks/run_h100.sh OUT_DIR    # the rematerialised large systems
#   STEPS="memory" bash benchmarks/run_h100.sh OUT_DIR    # XLA memory plans, peaks, times of the JAX MD forces
#   STEPS="attention attention_large attention_profile" bash benchmarks/run_h100.sh OUT_DIR    # the kernel
# A change against a base tree, alternating on one machine: benchmarks/ab_attention.sh.
# Expects: the carried wheels in .whl/ (packages missing on the GPU image: jraph, ase, ase-db-backends,
# lmdb, jax-md and its pure-Python needs, e3nn-jax; flax/orbax at our pins), and the SPICE sample in
# .gpu_data/ (a copy of ../shared/data, never committed). Each step has its own wall-clock limit so that
# one slow step cannot eat the others' time; results land in OUT_DIR/results.tar.gz plus one log per step.
set -uo pipefail
OUT_DIR="${1:?usage: run_h100.sh OUT_DIR}"
STEPS="${STEPS:-train attention torch md}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="/tmp/site:$PWD" || exit 1
commit="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p "$OUT_DIR/results"
run() {  # name, limit_s, command...
  local name="$1" limit="$2"; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  echo "=== $name exit $? $(date +%T)"; tail -n 25 "$OUT_DIR/$name.log"
}
for step in $STEPS; do case "$step" in
  train) run train "${TRAIN_LIMIT:-210}" python3 -m train.cli train --config configs/paper_spice.yaml \
           --data .gpu_data/spice_n2.hdf5 --workdir /tmp/run_paper --overwrite --no-final-eval \
           --set model.attention_impl=pallas train.steps="${TRAIN_STEPS:-150}" train.eval_every=1000000 \
           && cp /tmp/run_paper/*.jsonl /tmp/run_paper/*.png "$OUT_DIR/results/" 2>/dev/null ;;
  attention) run attention "${ATTN_LIMIT:-330}" python3 benchmarks/attention.py \
           --phases validate,bench,pytest --sizes 1000,10000 --budget-s 320 --commit "$commit" \
           --out "$OUT_DIR/results/attention.json" ;;
  attention_large) run attention_large "${ATTN_LARGE_LIMIT:-300}" python3 benchmarks/attention.py \
           --phases bench --sizes 100000 --impls pallas,pipeline,message,pipeline_message \
           --dtypes float32,bfloat16 \
           --budget-s 290 --commit "$commit" --out "$OUT_DIR/results/attention_100k.json" ;;
  attention_profile) run attention_profile "${ATTN_PROFILE_LIMIT:-240}" \
           bash benchmarks/profile_attention.sh "$OUT_DIR/results/attention_profile" 100000 \
           && rm -f "$OUT_DIR/results/attention_profile/"*.ncu-rep ;;
  torch) run torch "${TORCH_LIMIT:-250}" python3 benchmarks/compare_torch.py --quick --budget-s 230 \
           --commit "$commit" --out "$OUT_DIR/results/compare_torch" ;;
  torch_large) run torch_large "${TORCH_LARGE_LIMIT:-280}" python3 benchmarks/compare_torch.py --quick \
           --budget-s 270 --impls jax-pallas-remat --sizes 100000 --batches '' --train-impls none \
           --fit-resolution 1.5 --commit "$commit" --out "$OUT_DIR/results/compare_torch_remat" ;;
  md) run md "${MD_LIMIT:-280}" python3 benchmarks/md.py --sizes 1000,10000 --steps 30 --budget-s 265 \
           --commit "$commit" --out "$OUT_DIR/results/md.json" ;;
  memory) run memory "${MEMORY_LIMIT:-330}" python3 benchmarks/memory_plan.py --remat --sizes 10000,100000 \
           --programs forces,step --run --commit "$commit" --out "$OUT_DIR/results/memory_plan.json" ;;
  md_large) run md_large "${MD_LARGE_LIMIT:-280}" python3 benchmarks/md.py --remat --sizes 100000 \
           --steps 10 --chunk 5 --budget-s 265 --commit "$commit" --out "$OUT_DIR/results/md_large.json" ;;
esac; done
cp benchmarks/RESULTS.md "$OUT_DIR/results/RESULTS.md"
tar czf "$OUT_DIR/results.tar.gz" -C "$OUT_DIR" results && rm -rf "$OUT_DIR/results"
