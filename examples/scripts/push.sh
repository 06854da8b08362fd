#!/usr/bin/env bash
# The one command that replaces a "docker login, build, tag, push" script.
#
# Before (needs a Docker daemon, buildx and QEMU for the arm64 half, and a login step):
#
#   aws ecr get-login-password --region eu-west-1 |
#     docker login --username AWS --password-stdin 123456789012.dkr.ecr.eu-west-1.amazonaws.com
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     -t 123456789012.dkr.ecr.eu-west-1.amazonaws.com/hello:"$TAG" --push .
#
# After: the binaries are cross-compiled as usual, e.g.
#
#   cargo zigbuild --release --locked --target x86_64-unknown-linux-musl
#   cargo zigbuild --release --locked --target aarch64-unknown-linux-musl
#
# and one imgbuild command builds both platforms' images and the index, logs in (ECR tokens
# from the AWS credential chain; other registries from ~/.docker/config.json), pushes, tags,
# and prints REPO@sha256:... for the deploy step. Same inputs, same digest.
#
# Usage: REPO=123456789012.dkr.ecr.eu-west-1.amazonaws.com/hello [TAG=v1] [SPEC=...] push.sh
set -euo pipefail

: "${REPO:?set REPO to REGISTRY/PATH, e.g. 123456789012.dkr.ecr.eu-west-1.amazonaws.com/hello}"
TAG="${TAG:-$(git rev-parse --short HEAD 2>/dev/null || echo latest)}"
SPEC="${SPEC:-build-specs/hello.toml}"

imgbuild push -f "$SPEC" --repo "$REPO" --tag "$TAG" --platform linux/amd64,linux/arm64
