#!/usr/bin/env bash
# The README's main command: set up (idempotent), then `fastkd quickstart` on the embedded
# digits demo (demo folder -> pack -> teacher -> two students -> report). Arguments go to
# `fastkd quickstart`, e.g. `bash scripts/quickstart.sh --out runs/quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fastkd quickstart "$@"
