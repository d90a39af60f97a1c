#!/usr/bin/env bash
# Set up the virtual environment (first run only) and run the whole test suite on the CPU.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m pytest tests -q "$@"
