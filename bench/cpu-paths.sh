#!/usr/bin/env bash
# Does a deflate engine give the same bytes on every CPU? Layer digests must not depend on the
# machine, and both ISA-L and zlib-rs pick code paths by CPU features at run time.
# Runs each engine natively and under qemu-x86_64 user emulation with older CPU models
# (qemu64: no SSE4.2/AVX; Nehalem: SSE4.2; Haswell: AVX2) and prints the output digests.
#
#   apt-get install isal qemu-user-static
#   bash bench/cpu-paths.sh            # CPU_PATHS_MIB=4
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${COMP_DIR:-/tmp/imgbuild-compression}"
MIB="${CPU_PATHS_MIB:-4}"
QEMU="$(command -v qemu-x86_64-static || command -v qemu-x86_64)"
[[ -f "$WORK/in.tar" ]] || { echo "run bench/compression.sh first (it makes $WORK/in.tar)" >&2; exit 1; }
DEFLATE_BIN="${DEFLATE_BIN:-$(cd "$ROOT" && cargo build --release --quiet --bench deflate --message-format=json |
    python3 -c 'import json, sys; print([j["executable"] for j in map(json.loads, sys.stdin) if j.get("executable")][-1])')}"
head -c "$((MIB << 20))" "$WORK/in.tar" >"$WORK/paths.tar"

sum() { "$@" <"$WORK/paths.tar" 2>/dev/null | sha256sum | cut -c1-16; }
echo "| engine, level | native ($(grep -o -m1 -w 'avx512f\|avx2' /proc/cpuinfo | head -1)) | qemu64 | Nehalem | Haswell | same everywhere |"
echo "|---|---|---|---|---|---|"
for spec in "ISA-L igzip|0 1 2 3" "imgbuild zlib-rs|1 2 3 4 5 6 7 8 9"; do
    IFS='|' read -r name levels <<<"$spec"
    for l in $levels; do
        if [[ "$name" == ISA-L* ]]; then args=(/usr/bin/igzip "-$l" -c -); else args=("$DEFLATE_BIN" --level "$l"); fi
        n="$(sum "${args[@]}")"
        row="| $name -$l | $n"
        same=yes
        for cpu in qemu64 Nehalem Haswell; do
            q="$(sum "$QEMU" -cpu "$cpu" "${args[@]}")"
            row+=" | $q"
            [[ "$q" == "$n" ]] || same=no
        done
        echo "$row | $same |"
    done
done
