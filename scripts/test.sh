#!/usr/bin/env bash
# Set up the virtual environment (first run only) and run the whole test suite on the CPU, the test
# files shared out over E2F_TEST_WORKERS worker processes (default 2: XLA compiles on about one core,
# so two workers keep two cores busy; each file stays in one worker, so its module fixtures and
# compilations are made once). E2F_TEST_WORKERS=0 runs everything in this process.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m pytest tests -q -n "${E2F_TEST_WORKERS:-2}" --dist loadfile "$@"
