#!/usr/bin/env bash
# A layer of many small files: wall time, peak RSS and files/s of `imgbuild build` with a cold
# and a warm layer cache, and what removing the tree and the cache afterwards costs.
#
#   bash bench/many-files.sh               # BENCH_FILES=100000, BENCH_DIR=/tmp/imgbuild-bench
#
# Called by bench/run.sh at its end; runs on its own too. The files are 100 directories of
# small distinct files (a few bytes each) under BENCH_DIR, on whatever disk that is. The
# cache keeps one content-digest record per input file (src/cache.rs, `files/`), so a cold
# build writes as many small files as it reads: on a disk mounted with `discard` (this
# machine's ext4) unlinking them afterwards runs at a few hundred files per second, which
# is what made the 100,000-file integration test look hung (tests/it/scale.rs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FILES="${BENCH_FILES:-100000}"
WORK="${BENCH_DIR:-/tmp/imgbuild-bench}/many-files"
IMGBUILD="${IMGBUILD_BIN:-$ROOT/target/release/imgbuild}"

log() { printf 'bench: %s\n' "$*" >&2; }
command -v /usr/bin/time >/dev/null || { log "missing GNU time: run bash scripts/install-deps.sh bench"; exit 1; }
if [[ ! -x "$IMGBUILD" ]]; then
    log "building imgbuild (release)"
    (cd "$ROOT" && cargo build --release --quiet)
fi

rm -rf "$WORK"
mkdir -p "$WORK"
cd "$WORK"
log "making $FILES files"
python3 - "$FILES" <<'PY'
import os, sys
n = int(sys.argv[1])
per = max(1, n // 100)
for i in range(n):
    d = f"tree/d{i // per:03d}"
    if i % per == 0:
        os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i % per:05d}", "w") as f:
        f.write(f"{i}\n")
PY
printf 'platforms = ["linux/amd64"]\n[[layer]]\nfiles = [{ src = "tree", dest = "/data" }]\n' >spec.toml
export IMGBUILD_CACHE="$WORK/cache" NO_COLOR=1

# row NAME CMD: one timed run; prints "NAME wall_s rss_mib files_per_s".
row() {
    /usr/bin/time -f '%e %M' -o time.txt bash -c "$2" >/dev/null
    read -r wall kib <time.txt
    awk -v n="$1" -v f="$FILES" -v w="$wall" -v k="$kib" \
        'BEGIN { printf "%s %s %d %.0f\n", n, w, k / 1024, f / (w + 0.001) }'
}
{
    row cold "'$IMGBUILD' build -q -f spec.toml -o out"
    row warm "'$IMGBUILD' build -q -f spec.toml -o out"
    row cleanup "rm -rf out cache tree"
} >rows.txt

printf '\n| %s small files, one layer | wall s | peak RSS MiB | files/s |\n|---|---:|---:|---:|\n' "$FILES"
while read -r name wall rss rate; do
    case "$name" in
        cold) label="imgbuild build, cold cache" ;;
        warm) label="imgbuild build, warm cache" ;;
        cleanup) label="rm -rf of tree, cache and layout (the disk's cost)"; rss="" ;;
    esac
    printf '| %s | %s | %s | %s |\n' "$label" "$wall" "$rss" "$rate"
done <rows.txt
