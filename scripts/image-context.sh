#!/usr/bin/env bash
# Assemble the build context of imgbuild's own image (build-specs/imgbuild.toml):
#
#   bash scripts/image-context.sh DIR AMD64_BINARY ARM64_BINARY
#   imgbuild push -f build-specs/imgbuild.toml --context DIR --repo REPO --tag TAG
#
# DIR/common/etc/{passwd,group,nsswitch.conf}   root and nonroot (65532), from build-specs/imgbuild-files/
# DIR/common/etc/ssl/certs/ca-certificates.crt  the build machine's Debian/Ubuntu CA bundle
# DIR/common/{home/nonroot,tmp,cache}           empty directories (HOME, TMPDIR, IMGBUILD_CACHE)
# DIR/amd64/imgbuild, DIR/arm64/imgbuild        the binaries (static: musl, cargo-zigbuild)
#
# A binary given as "" or "-" is left out; build only the other platform then
# (`--platform linux/amd64`). DIR is emptied first.
#
# Tests only: IMGBUILD_IMAGE_BUNDLE_LIBS=1 accepts a dynamically linked binary for the build
# machine's own architecture and copies exactly the libraries it loads (its ELF interpreter
# and what `ldd` lists, e.g. ld-linux, libc, libm, libgcc_s) to DIR/<arch>/libs/, at their
# absolute paths, and writes DIR/imgbuild-bundled.toml: the spec plus one layer holding them.
# Without it a dynamically linked binary is an error: the image has no libraries.
set -euo pipefail

die() { printf 'image-context: error: %s\n' "$*" >&2; exit 2; }

[[ $# -eq 3 ]] || die "usage: $0 DIR AMD64_BINARY ARM64_BINARY (\"-\" or \"\" leaves a platform out)"
DIR="$1"
AMD64_BIN="$2"
ARM64_BIN="$3"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
FILES="$ROOT/build-specs/imgbuild-files"
SPEC="$ROOT/build-specs/imgbuild.toml"
CA_BUNDLE="${IMGBUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
BUNDLE_LIBS="${IMGBUILD_IMAGE_BUNDLE_LIBS:-}"

is_none() { [[ -z "$1" || "$1" == "-" ]]; }
if is_none "$AMD64_BIN" && is_none "$ARM64_BIN"; then die "no binary given: name AMD64_BINARY, ARM64_BINARY or both"; fi
[[ -s "$CA_BUNDLE" ]] ||
    die "$CA_BUNDLE missing: install Debian's ca-certificates (apt-get install ca-certificates)"
grep -q 'BEGIN CERTIFICATE' "$CA_BUNDLE" || die "$CA_BUNDLE holds no PEM certificate"

# The ELF interpreter of $1 (empty for a static binary).
interpreter() {
    command -v readelf >/dev/null 2>&1 || die "readelf not found: install binutils"
    readelf -lW "$1" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p'
}

rm -rf "$DIR"
mkdir -p "$DIR/common/etc/ssl/certs" "$DIR/common/home/nonroot" "$DIR/common/tmp" "$DIR/common/cache"
install -m 0644 "$FILES/passwd" "$FILES/group" "$FILES/nsswitch.conf" "$DIR/common/etc/"
install -m 0644 "$CA_BUNDLE" "$DIR/common/etc/ssl/certs/ca-certificates.crt"

BUNDLED_ARCH=""
add_binary() { # ARCH BINARY
    local arch="$1" bin="$2" interp lib
    [[ -f "$bin" ]] || die "$arch binary $bin does not exist: build it first"
    mkdir -p "$DIR/$arch"
    install -m 0755 "$bin" "$DIR/$arch/imgbuild"
    interp="$(interpreter "$bin")"
    [[ -z "$interp" ]] && return 0
    if [[ "$BUNDLE_LIBS" != "1" ]]; then
        die "$bin is dynamically linked ($interp) but the image has no libraries: build a static binary (cargo zigbuild --release --target $( [[ $arch == amd64 ]] && echo x86_64 || echo aarch64 )-unknown-linux-musl), or set IMGBUILD_IMAGE_BUNDLE_LIBS=1 (tests)"
    fi
    [[ -z "$BUNDLED_ARCH" ]] || die "IMGBUILD_IMAGE_BUNDLE_LIBS: only one platform can be bundled ($BUNDLED_ARCH and $arch given)"
    BUNDLED_ARCH="$arch"
    # The interpreter plus every library the loader resolves (ldd runs the interpreter, so this
    # works for the build machine's own architecture only). `cp -L`: the files, not symlinks.
    {
        echo "$interp"
        ldd "$bin" | grep -o '/[^ ]*' || true
    } | sort -u | while read -r lib; do
        [[ -e "$lib" ]] || die "ldd named $lib, which does not exist"
        mkdir -p "$DIR/$arch/libs$(dirname "$lib")"
        cp -L "$lib" "$DIR/$arch/libs$lib"
        chmod 0755 "$DIR/$arch/libs$lib"
    done
    grep -q 'not found' <(ldd "$bin") && die "ldd $bin: a library is not found"
    return 0
}

# (Not `is_none X || add_binary`: errexit does not apply inside the left side of a `||`.)
if ! is_none "$AMD64_BIN"; then add_binary amd64 "$AMD64_BIN"; fi
if ! is_none "$ARM64_BIN"; then add_binary arm64 "$ARM64_BIN"; fi

if [[ -n "$BUNDLED_ARCH" ]]; then
    # The spec's layers ([[layer]] tables end the file), then one more with the libraries.
    {
        cat "$SPEC"
        printf '\n# Added by scripts/image-context.sh (IMGBUILD_IMAGE_BUNDLE_LIBS=1): the libraries\n'
        printf '# the dynamically linked test binary loads, at their absolute paths.\n[[layer]]\nfiles = [\n'
        for top in "$DIR/$BUNDLED_ARCH/libs"/*; do
            top="$(basename "$top")"
            printf '  { src = "{arch}/libs/%s", dest = "/%s" },\n' "$top" "$top"
        done
        printf ']\n'
    } >"$DIR/imgbuild-bundled.toml"
    printf 'image-context: bundled for %s: %s\n' "$BUNDLED_ARCH" \
        "$(cd "$DIR/$BUNDLED_ARCH/libs" && find . -type f | sort | tr '\n' ' ')" >&2
fi
printf 'image-context: %s ready\n' "$DIR" >&2
