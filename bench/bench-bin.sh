# shellcheck shell=bash
# Sourced by bench/*.sh. bench_bin NAME: build the bench binary NAME (bench/NAME.rs, a
# `[[bench]]` with `harness = false` in Cargo.toml) in release mode and print its path (cargo
# names it target/release/deps/NAME-HASH; its JSON messages say which).
bench_bin() {
    (cd "$ROOT" && cargo build --release --quiet --bench "$1" --message-format=json) |
        python3 -c 'import json, sys; name = sys.argv[1]; print([j["executable"] for j in map(json.loads, sys.stdin) if j.get("target", {}).get("name") == name and j.get("executable")][-1])' "$1"
}
