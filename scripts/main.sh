#!/usr/bin/env bash
# The README's main command: train the tiny E2Former on the built-in GFN2-xTB dataset on the CPU.
# First run: sets up .venv, builds the dataset (cached afterwards), trains within a ~10 minute budget
# on 2 cores, and leaves in runs/tiny/: checkpoints/, metrics.jsonl + CSVs, learning_curve.png and
# eval_table.md/json (energy meV/atom and force meV/A MAE per split and subset).
# Running it again resumes runs/tiny (nothing left to train: it re-evaluates); extra arguments are
# passed on, e.g. `bash scripts/main.sh --overwrite` to start over or `--set train.steps=1000`.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec e2former train --config configs/tiny.yaml --workdir runs/tiny "$@"
