#!/usr/bin/env bash
# THE test command: install what the tests need (fast when present), then run every test.
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh --test it smoke`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh test
exec cargo test --locked --all-targets "$@"
