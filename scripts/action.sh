#!/usr/bin/env bash
# The logic of the composite GitHub Action in action.yml: install imgbuild (unless the wanted
# one is already there), run `imgbuild push`, write the step outputs and a job summary.
#
# Inputs arrive as environment variables (action.yml maps each `with:` input to one):
#   INPUT_SPEC              build spec (default imgbuild.toml)          -> -f
#   INPUT_REPO              REGISTRY/PATH (default: the spec's)        -> --repo
#   INPUT_TAGS              newline- or comma-separated tags           -> --tag, each
#   INPUT_PLATFORMS         newline- or comma-separated platforms      -> --platform
#   INPUT_CONTEXT           directory `src` paths are relative to (and confined to) -> --context
#   INPUT_AWS_ROLE_ARN      ECR: role assumed on top of the chain      -> --aws-role-arn
#   INPUT_CREATE_REPOSITORY true/false (ECR create-on-push)            -> --create-repository
#   INPUT_COMPRESSION       gzip or zstd                               -> --compression
#   INPUT_VERSION           imgbuild release to use: vX.Y.Z or `latest`; empty = the action's
#                           own ref when that is a version tag, else `latest`
#
# Installation (first that applies):
#   1. IMGBUILD_BIN names an executable: it is used as is.
#   2. `imgbuild` on PATH whose `--version` is the wanted version (any version for `latest`).
#   3. The release asset imgbuild-<arch>-unknown-linux-musl for this runner (Linux x86_64 or
#      aarch64), verified against the release's SHA256SUMS: a mismatch, or an asset missing
#      from SHA256SUMS, fails the step (never falls back).
#   4. Fallback, when the release has no binary for this runner (another OS or architecture,
#      or a version without release assets: HTTP 404): `cargo install --locked --git` of the
#      project at that tag (the default branch for `latest`); needs a Rust toolchain.
# Knobs: IMGBUILD_RELEASE_REPO (owner/name of the releases; default the action's repository,
# else GITHUB_REPOSITORY),
# IMGBUILD_RELEASE_URL (base URL of the releases, default https://github.com/<repo>/releases),
# IMGBUILD_INSTALL_DIR (where to install; default under RUNNER_TOOL_CACHE).
#
# Credentials are not handled here: imgbuild finds what aws-actions/configure-aws-credentials
# (AWS_* variables) or docker/login-action (docker config.json) left behind. This script never
# prints the environment or runs with xtrace, so secrets do not reach the log.
set -euo pipefail

log() { printf 'imgbuild-action: %s\n' "$*" >&2; }
# GitHub renders `::error::` lines as annotations; elsewhere they are plain lines.
fail() {
    printf '::error title=imgbuild::%s\n' "$*" >&2
    exit 1
}

TMP="$(mktemp -d "${RUNNER_TEMP:-/tmp}/imgbuild-action.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# ------------------------------------------------------------------------------------------
# Which imgbuild
# ------------------------------------------------------------------------------------------

wanted_version() {
    local v="${INPUT_VERSION:-}"
    if [[ -z "$v" ]]; then
        # `uses: owner/imgbuild@v1.2.3` -> v1.2.3; a branch, a SHA or a local action -> latest.
        if [[ "${IMGBUILD_ACTION_REF:-}" =~ ^v[0-9]+\.[0-9]+\.[0-9]+([-+].*)?$ ]]; then
            v="$IMGBUILD_ACTION_REF"
        else
            v=latest
        fi
    fi
    if [[ "$v" != latest && "$v" != v* ]]; then
        v="v$v"
    fi
    printf '%s\n' "$v"
}

# Is $1 an imgbuild of version $2 (`latest` accepts any)?
is_wanted() {
    local bin="$1" version="$2" out
    out="$("$bin" --version 2>/dev/null)" || return 1
    [[ "$version" == latest || "$out" == "imgbuild ${version#v}" ]]
}

release_target() {
    local os arch
    os="$(uname -s)"
    arch="$(uname -m)"
    [[ "$os" == Linux ]] || return 1
    case "$arch" in
    x86_64 | amd64) echo x86_64-unknown-linux-musl ;;
    aarch64 | arm64) echo aarch64-unknown-linux-musl ;;
    *) return 1 ;;
    esac
}

# download URL FILE: 0 ok, 2 not found (404, or a missing file:// path), 1 other failure.
download() {
    local url="$1" file="$2" code rc=0
    code="$(curl -sSL --proto '=https,http,file' --retry 3 --connect-timeout 20 \
        -o "$file" -w '%{http_code}' "$url")" || rc=$?
    if [[ "$rc" -eq 0 && ("$code" == 200 || "$code" == 000) ]]; then
        return 0
    fi
    # curl: 37 = file:// not found; 22 never happens without -f; an HTTP status says the rest.
    if [[ "$code" == 404 || "$rc" -eq 37 ]]; then
        return 2
    fi
    log "download of $url failed (curl exit $rc, HTTP $code)"
    return 1
}

# install_release VERSION TARGET DIR: 0 installed, 2 no such release asset; exits on mismatch.
install_release() {
    local version="$1" target="$2" dir="$3" base asset url rc=0 want got
    [[ -n "${IMGBUILD_RELEASE_URL:-}" || -n "$RELEASE_REPO" ]] ||
        fail "no repository to download imgbuild from: set IMGBUILD_RELEASE_REPO=owner/name (or IMGBUILD_BIN)"
    base="${IMGBUILD_RELEASE_URL:-https://github.com/$RELEASE_REPO/releases}"
    base="${base%/}"
    asset="imgbuild-$target"
    if [[ "$version" == latest ]]; then
        url="$base/latest/download"
    else
        url="$base/download/$version"
    fi
    log "downloading $url/$asset"
    download "$url/$asset" "$TMP/$asset" || rc=$?
    [[ "$rc" -eq 0 ]] || return "$rc"
    download "$url/SHA256SUMS" "$TMP/SHA256SUMS" ||
        fail "the release $version has $asset but no SHA256SUMS ($url/SHA256SUMS): refusing an unverified binary"
    # sha256sum format: "<hex>  <name>" (binary mode marks the name with '*').
    want="$(awk -v a="$asset" '$2 == a || $2 == "*" a { print $1; exit }' "$TMP/SHA256SUMS")"
    [[ -n "$want" ]] || fail "SHA256SUMS of release $version has no line for $asset: refusing an unverified binary"
    got="$(sha256sum "$TMP/$asset" | awk '{ print $1 }')"
    if [[ "$got" != "$want" ]]; then
        fail "SHA256 mismatch for $asset of release $version: SHA256SUMS says $want, the download is $got; not installed"
    fi
    log "verified $asset (sha256 $got)"
    mkdir -p "$dir/bin"
    install -m 0755 "$TMP/$asset" "$dir/bin/imgbuild.tmp"
    mv "$dir/bin/imgbuild.tmp" "$dir/bin/imgbuild"
}

install_cargo() {
    local version="$1" dir="$2" args
    command -v cargo >/dev/null 2>&1 ||
        fail "no imgbuild release binary for $(uname -s)/$(uname -m) (version $version) and no cargo for the fallback: install a Rust toolchain first (e.g. dtolnay/rust-toolchain), or set IMGBUILD_BIN"
    args=(install --locked --root "$dir" --git "https://github.com/$RELEASE_REPO")
    [[ "$version" == latest ]] || args+=(--tag "$version")
    log "fallback: cargo ${args[*]} imgbuild"
    cargo "${args[@]}" imgbuild >&2
}

find_imgbuild() {
    local version="$1" target dir rc=0 found
    if [[ -n "${IMGBUILD_BIN:-}" ]]; then
        [[ -x "$IMGBUILD_BIN" ]] || fail "IMGBUILD_BIN=$IMGBUILD_BIN is not an executable"
        log "using IMGBUILD_BIN=$IMGBUILD_BIN"
        BIN="$IMGBUILD_BIN"
        return 0
    fi
    if found="$(command -v imgbuild)" && is_wanted "$found" "$version"; then
        log "using $found ($("$found" --version))"
        BIN="$found"
        return 0
    fi
    target="$(release_target)" || target=""
    dir="${IMGBUILD_INSTALL_DIR:-${RUNNER_TOOL_CACHE:-${RUNNER_TEMP:-$HOME/.cache}}/imgbuild/$version/${target:-source}}"
    if [[ -x "$dir/bin/imgbuild" && "$version" != latest ]]; then
        log "using the cached $dir/bin/imgbuild"
    elif [[ -n "$target" ]]; then
        install_release "$version" "$target" "$dir" || rc=$?
        case "$rc" in
        0) ;;
        2)
            log "release $version has no imgbuild-$target"
            install_cargo "$version" "$dir"
            ;;
        *) fail "could not download imgbuild $version (see above)" ;;
        esac
    else
        log "no release binary for $(uname -s)/$(uname -m)"
        install_cargo "$version" "$dir"
    fi
    BIN="$dir/bin/imgbuild"
    [[ -x "$BIN" ]] || fail "installation left no $BIN"
    # Later steps of the job (e.g. `imgbuild resolve`) find it on PATH.
    if [[ -n "${GITHUB_PATH:-}" ]]; then
        printf '%s\n' "$dir/bin" >>"$GITHUB_PATH"
    fi
    log "installed $BIN ($("$BIN" --version))"
}

# ------------------------------------------------------------------------------------------
# The push
# ------------------------------------------------------------------------------------------

# split TEXT: one item per line from a newline- or comma-separated list, blanks trimmed.
split() {
    printf '%s\n' "$1" | tr ',' '\n' | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' | sed '/^$/d'
}

is_true() {
    # tr, not ${1,,}: macOS runners (the cargo fallback) have bash 3.2.
    case "$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')" in
    true | yes | 1 | on) return 0 ;;
    false | no | 0 | off | '') return 1 ;;
    *) fail "create-repository must be true or false, not '$1'" ;;
    esac
}

# action.yml passes github.action_repository/action_ref as IMGBUILD_ACTION_*; a local action
# (`uses: ./`) has none, so this repository's own releases are used.
RELEASE_REPO="${IMGBUILD_RELEASE_REPO:-${IMGBUILD_ACTION_REPOSITORY:-}}"
[[ -n "$RELEASE_REPO" ]] || RELEASE_REPO="${GITHUB_REPOSITORY:-}"
VERSION="$(wanted_version)"
BIN=""
find_imgbuild "$VERSION"

args=(push -f "${INPUT_SPEC:-imgbuild.toml}")
[[ -z "${INPUT_REPO:-}" ]] || args+=(--repo "$INPUT_REPO")
while IFS= read -r tag; do
    args+=(--tag "$tag")
done < <(split "${INPUT_TAGS:-}")
platforms="$(split "${INPUT_PLATFORMS:-}" | paste -sd, -)"
[[ -z "$platforms" ]] || args+=(--platform "$platforms")
[[ -z "${INPUT_CONTEXT:-}" ]] || args+=(--context "$INPUT_CONTEXT")
[[ -z "${INPUT_AWS_ROLE_ARN:-}" ]] || args+=(--aws-role-arn "$INPUT_AWS_ROLE_ARN")
! is_true "${INPUT_CREATE_REPOSITORY:-false}" || args+=(--create-repository)
[[ -z "${INPUT_COMPRESSION:-}" ]] || args+=(--compression "$INPUT_COMPRESSION")

# The metadata file outlives the step (the `metadata` output names it); RUNNER_TEMP is
# emptied at the end of the job.
METADATA="$(mktemp -d "${RUNNER_TEMP:-${TMPDIR:-/tmp}}/imgbuild-metadata.XXXXXX")/metadata.json"
args+=(--metadata-file "$METADATA" --digest-file "$TMP/digest" --image-refs "$TMP/image")

log "imgbuild ${args[*]}"
# imgbuild itself appends digest= and image= to GITHUB_OUTPUT; this script writes the outputs
# (all three, once), so the child does not get the variable.
env -u GITHUB_OUTPUT "$BIN" "${args[@]}"

digest="$(head -n1 "$TMP/digest")"
image="$(head -n1 "$TMP/image")"
[[ "$digest" == sha256:* && "$image" == *@sha256:* ]] ||
    fail "imgbuild succeeded but wrote no digest (digest file: '$digest', image: '$image')"

if [[ -n "${GITHUB_OUTPUT:-}" ]]; then
    {
        printf 'digest=%s\n' "$digest"
        printf 'image=%s\n' "$image"
        printf 'metadata=%s\n' "$METADATA"
    } >>"$GITHUB_OUTPUT"
fi

if [[ -n "${GITHUB_STEP_SUMMARY:-}" ]]; then
    # shellcheck disable=SC2016 # the backticks are Markdown code spans, not substitutions
    {
        printf '### imgbuild pushed `%s`\n\n' "$image"
        printf '| what | value |\n|---|---|\n'
        printf '| digest | `%s` |\n' "$digest"
        if command -v jq >/dev/null 2>&1; then
            printf '| tags | %s |\n' "$(jq -r '[.tags[] | "`" + . + "`"] | join(", ")' "$METADATA")"
            jq -r '.manifests[] | "| \(.platform) | `\(.digest)` |"' "$METADATA"
        fi
        printf '\n'
    } >>"$GITHUB_STEP_SUMMARY"
fi
log "pushed $image"
