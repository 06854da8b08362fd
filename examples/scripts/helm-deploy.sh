#!/usr/bin/env bash
# Deploy with Helm by digest, never by a mutable tag: push, read the digest from imgbuild's
# metadata file, hand it to the chart.
#
# The chart's deployment template pins the image by digest, e.g.
#
#   image: "{{ .Values.image.repository }}@{{ .Values.image.digest }}"
#
# The metadata file (--metadata-file) is JSON:
#   { "digest": "sha256:...",            the image index: what the cluster pulls
#     "repository": "REGISTRY/PATH", "image": "REGISTRY/PATH@sha256:...",
#     "tags": [...], "mediaType": "...", "size": N,
#     "manifests": [ { "platform": "linux/amd64", "digest": "sha256:...", ... }, ... ] }
#
# Usage: REPO=REGISTRY/PATH [TAG=v1] [SPEC=...] [RELEASE=hello] [CHART=./chart]
#        [NAMESPACE=default] helm-deploy.sh
#        DRY_RUN=1 prints the helm command instead of running it.
set -euo pipefail

: "${REPO:?set REPO to REGISTRY/PATH}"
TAG="${TAG:-$(git rev-parse --short HEAD 2>/dev/null || echo latest)}"
SPEC="${SPEC:-build-specs/hello.toml}"
RELEASE="${RELEASE:-hello}"
CHART="${CHART:-./chart}"
NAMESPACE="${NAMESPACE:-default}"

meta="$(mktemp)"
trap 'rm -f "$meta"' EXIT

imgbuild push -f "$SPEC" --repo "$REPO" --tag "$TAG" --metadata-file "$meta" >/dev/null

repository="$(jq -r .repository "$meta")"
digest="$(jq -r .digest "$meta")"

cmd=(helm upgrade --install "$RELEASE" "$CHART" --namespace "$NAMESPACE" --wait
    --set-string "image.repository=$repository"
    --set-string "image.digest=$digest")
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
else
    "${cmd[@]}"
fi
