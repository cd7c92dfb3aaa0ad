#!/usr/bin/env bash
# The README's test command: set up (idempotent), then the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`, or `-n 0` to run in one
# process. Two pytest-xdist workers, a test file each at a time (--dist loadfile: a file's
# module-scoped fixtures are built once): most tests use one core (one intra-op thread, or a
# subprocess), so two cores finish the suite in about two thirds of the serial time.
# FASTKD_TEST_WORKERS sets the number of workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# --no-loadscope-reorder: files go out in collection order (tests/conftest.py puts the longest first),
# not by their number of tests, so the quickstart's minutes start at once instead of last.
exec .venv/bin/python -m pytest -q -ra --durations=15 -n "${FASTKD_TEST_WORKERS:-2}" --dist loadfile \
  --no-loadscope-reorder "$@"
