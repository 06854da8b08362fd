#!/usr/bin/env bash
# THE test command: install what the tests need (fast when present), then run every test.
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh --test it smoke`.
#
# Skipped tests (a missing prerequisite, see tests/it/harness.rs) are recorded in
# $IMGBUILD_TEST_SKIP_LOG and listed with their count at the end. With CI set, a skip fails
# its test unless IMGBUILD_TEST_ALLOW_SKIP (comma list, e.g. docker,qemu) allows it.
# The exit code is cargo test's.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh test

skip_log="$(mktemp "${TMPDIR:-/tmp}/imgbuild-skips.XXXXXX")"
trap 'rm -f "$skip_log"' EXIT
export IMGBUILD_TEST_SKIP_LOG="$skip_log"

rc=0
cargo test --locked --all-targets "$@" || rc=$?

skips=$(grep -c . "$skip_log" || true)
echo
echo "skipped tests: $skips"
if [[ "$skips" -gt 0 ]]; then
    sort "$skip_log" | while IFS=$'\t' read -r prereq test reason; do
        printf '  SKIPPED [%s] %s: %s\n' "$prereq" "$test" "$reason"
    done
fi
exit "$rc"
