#!/usr/bin/env bash
# The main job, from a fresh Debian 12 with only a Rust toolchain: install the C linker rustc
# needs, build imgbuild, and build the example multi-arch image (linux/amd64, linux/arm64,
# linux/arm/v7) into a local OCI image layout at out/hello. No registry, no credentials.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh build
cargo build --release --locked
./target/release/imgbuild build -f build-specs/hello.toml --output out/hello "$@"
echo "OCI layout: out/hello (inspect with: skopeo inspect oci:out/hello)" >&2
