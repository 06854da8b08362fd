#!/usr/bin/env bash
# Deflate engines on one core, per level: seconds and bytes against `gzip -6` of the same tar.
# Produces the table in bench/compression.md.
#
#   apt-get install libdeflate-tools isal pigz zstd     # (scripts/install-deps.sh bench has pigz, zstd)
#   bash bench/compression.sh                           # COMP_RUNS=3 COMP_CPU=1 COMP_MIB=100
#   (COMP_SKIP_TOOLS=1: only gzip -6 and imgbuild's rows; COMP_ZLIBRS_LEVELS="5 6": those levels)
#
# Input: the same seeded artifact bench/run.sh makes (slices of the machine's shared libraries
# and documentation), as a tar with one member. Each command runs pinned to one CPU
# (`taskset -c $COMP_CPU`), best of COMP_RUNS; the table shows the best wall time and the user+sys
# CPU seconds of that run (on a shared machine the CPU seconds are the steadier figure).
# imgbuild's own rows go through its compressor (src/compress.rs) with 1 thread, via the
# bench binary `deflate` (bench/deflate.rs): the pigz-style framing is included.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="${COMP_RUNS:-3}"
CPU="${COMP_CPU:-1}"
MIB="${COMP_MIB:-100}"
WORK="${COMP_DIR:-/tmp/imgbuild-compression}"
LEVELS_ZLIBRS="${COMP_ZLIBRS_LEVELS-2 3 4 5 6 7 8 9}"
# imgbuild's own encoder (src/deflate.rs): `fast` (= level 1) and the alternatives measured for it,
# as `--own HASH_BITS,WAYS,INSERT_MAX,SKIP_SHIFT,BLOCK_SYMS` (bench/deflate.rs).
OWN="${COMP_OWN-15,2,0,0,0 15,1,0,0,0 15,2,0,4,0 15,2,8,4,8192 16,1,0,4,8192 16,1,4,4,8192}"
log() { printf 'compression: %s\n' "$*" >&2; }

for tool in gzip libdeflate-gzip igzip pigz zstd taskset python3 /usr/bin/time; do
    command -v "$tool" >/dev/null 2>&1 || { log "missing $tool"; exit 1; }
done
if [[ -n "$LEVELS_ZLIBRS$OWN" ]]; then
    log "building the deflate bench binary (release)"
    # shellcheck disable=SC1091 # bench/bench-bin.sh (bench_bin), sourced by path
    source "$ROOT/bench/bench-bin.sh"
    DEFLATE_BIN="$(bench_bin deflate)"
fi

mkdir -p "$WORK"
cd "$WORK"
if [[ ! -f in.tar || "$(stat -c %s in.tar)" -lt $((MIB << 20)) ]]; then
    sed -n '/^make_artifact() {/,/^}/p' "$ROOT/bench/run.sh" >mk.sh
    # shellcheck disable=SC1091
    source mk.sh
    make_artifact app.bin 1 "$MIB"
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf in.tar app.bin
    rm -f app.bin
fi
# Warm the page cache.
cat in.tar >/dev/null

: >rows.txt
# row LABEL CMD: CMD reads in.tar and writes the compressed bytes to stdout.
row() {
    local label="$1" cmd="$2" i best="" line
    for ((i = 1; i <= RUNS; i++)); do
        /usr/bin/time -f '%e %U %S' -o t.txt taskset -c "$CPU" bash -c "$cmd" >out.bin
        line="$(tail -1 t.txt)"
        if [[ -z "$best" || "$(echo "$line $best" | awk '{print ($1 < $4)}')" == 1 ]]; then
            best="$line"
        fi
    done
    printf '%s\t%s\t%s\n' "$label" "$best" "$(stat -c %s out.bin)" >>rows.txt
    log "$label: $best $(stat -c %s out.bin)"
}

row "GNU gzip -6 (reference)" "gzip -6 -n -c in.tar"
if [[ -z "${COMP_SKIP_TOOLS:-}" ]]; then
row "GNU gzip -1" "gzip -1 -n -c in.tar"
row "pigz -p1 -6 (zlib, 128 KiB blocks + dictionaries)" "pigz -p 1 -6 -n -c in.tar"
row "pigz -p1 -6 -i (independent blocks: no dictionaries)" "pigz -p 1 -6 -i -n -c in.tar"
for l in 1 2 3 4 5 6 7 8 9 12; do
    row "libdeflate -$l (one buffer, one stream)" "libdeflate-gzip -$l -c <in.tar"
done
for l in 0 1 2 3; do
    row "ISA-L igzip -$l" "igzip -$l -c <in.tar"
done
for l in 1 3; do
    row "zstd -$l -T1" "zstd -q -$l -T1 -c <in.tar"
done
fi
for l in $LEVELS_ZLIBRS; do
    row "imgbuild zlib-rs -$l (pigz framing, 1 thread)" "$DEFLATE_BIN --level $l <in.tar"
done
if [[ -n "$OWN" ]]; then
    row "imgbuild own encoder, level 1 = fast (pigz framing, 1 thread)" "$DEFLATE_BIN --level 1 <in.tar"
    for o in $OWN; do
        row "imgbuild own encoder --own $o" "$DEFLATE_BIN --own $o <in.tar"
    done
fi
if [[ -n "${COMP_EXTRA:-}" ]]; then
    # COMP_EXTRA='label|command;label|command': further rows (e.g. other block sizes).
    IFS=';' read -ra extra <<<"$COMP_EXTRA"
    for e in "${extra[@]}"; do row "${e%%|*}" "${e#*|}"; done
fi

python3 - "$RUNS" "$CPU" <<'PY'
import sys
runs, cpu = sys.argv[1], sys.argv[2]
rows = [l.rstrip("\n").split("\t") for l in open("rows.txt")]
ref = next(r for r in rows if r[0].startswith("GNU gzip -6"))
ref_bytes = int(ref[2])
ref_cpu = sum(map(float, ref[1].split()[1:]))
print(f"| engine, level (taskset -c {cpu}, best of {runs}) | wall s | CPU s | x gzip -6 speed | bytes | bytes vs gzip -6 |")
print("|---|---:|---:|---:|---:|---:|")
for label, t, size in rows:
    wall, user, sys_ = map(float, t.split())
    cpu_s = user + sys_
    print(f"| {label} | {wall:.2f} | {cpu_s:.2f} | {ref_cpu / max(cpu_s, 0.001):.1f} | {int(size)} | {int(size) / ref_bytes:.3f} |")
PY
