//! Entry points for fuzzing the parsers that read untrusted text: the build
//! spec, and what a registry sends back (`WWW-Authenticate` challenges, error bodies, upload
//! `Location`s, `Retry-After`). The cargo-fuzz targets in `fuzz/` call these; so does a
//! bounded, seeded property test below, so that CI covers them without a nightly toolchain.
//! Not a stable API (hidden from the docs).
//!
//! Each function also checks the invariants callers rely on and panics if one breaks, so a
//! fuzzer finds wrong answers as well as crashes.

use crate::digest::Digest;
use reqwest::Url;
use std::path::Path;

/// Parse a spec; an error must be one line naming the file.
pub fn spec(text: &str) {
    if let Err(e) = crate::spec::parse(text, Path::new("fuzz.toml")) {
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "multi-line spec error: {msg:?}");
        assert!(
            msg.starts_with("fuzz.toml"),
            "error without its file: {msg:?}"
        );
    }
}

/// Parse `WWW-Authenticate` values; schemes come out lowercase and non-empty.
pub fn challenges(values: &[&str]) {
    for c in super::auth::parse_challenges(values.iter().copied()) {
        assert!(!c.scheme.is_empty());
        assert_eq!(c.scheme, c.scheme.to_ascii_lowercase());
        for name in c.params.keys() {
            assert_eq!(*name, name.to_ascii_lowercase());
        }
    }
}

/// Summarise an error body for a message: one line, at most 200 characters plus an ellipsis
/// (and the HTML prefix).
pub fn error_body(body: &[u8], html: bool) {
    let s = super::client::snippet(body, html);
    assert!(!s.contains(['\n', '\r']), "multi-line snippet: {s:?}");
    assert!(s.chars().count() <= 260, "snippet too long: {}", s.len());
}

/// Resolve an upload `Location` against the POST URL: the result has our digest in its query
/// and never moves from https to http.
pub fn location(location: &str) {
    let digest = Digest::of(b"fuzz");
    for base in [
        "https://reg.example.com/v2/a/blobs/uploads/",
        "http://127.0.0.1:5000/v2/a/blobs/uploads/",
    ] {
        let base = Url::parse(base).expect("a constant URL parses");
        if let Ok(url) = super::upload::upload_url(&base, location, &digest) {
            assert!(
                url.query_pairs()
                    .any(|(k, v)| k == "digest" && v == digest.to_string().as_str()),
                "{url}"
            );
            assert!(base.scheme() == "http" || url.scheme() == "https", "{url}");
            let _ = super::client::display_url(&url);
        }
    }
}

/// Parse a `Retry-After` value.
pub fn retry_after(value: &str) {
    let _ = super::retry::parse_retry_after(value, std::time::SystemTime::now());
}

#[cfg(test)]
mod tests {
    //! Seeded random inputs: mutations of real examples plus random bytes. Deterministic, a
    //! few thousand cases per parser, well under a second.

    /// splitmix64: tiny, seedable, good enough to pick mutations.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Bytes that matter to these parsers, to splice in.
    const INTERESTING: &[&[u8]] = &[
        b"\"",
        b"\\",
        b",",
        b"=",
        b"==",
        b" ",
        b"\n",
        b"\r\n",
        b"\0",
        b"[",
        b"]",
        b"{",
        b"}",
        b"'''",
        b"\"\"\"",
        b"#",
        b":",
        b"/",
        b"//",
        b"..",
        b"?",
        b"&",
        b"%",
        b"%zz",
        b"\xff",
        b"\xc3",
        b"\xe2\x80\xae",
        b"https://",
        b"http://",
        b"[[layer]]",
        b"0o777",
        b"-1",
        b"99999999999999999999",
        b"<html>",
        b"{\"errors\":[",
        b"Bearer ",
        b"GMT",
    ];

    fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..=rng.below(6) {
            let at = rng.below(v.len() + 1);
            match rng.below(5) {
                0 if !v.is_empty() => {
                    let end = (at + rng.below(16)).min(v.len());
                    v.drain(at.min(end)..end);
                }
                1 => {
                    let piece = INTERESTING[rng.below(INTERESTING.len())];
                    v.splice(at..at, piece.iter().copied());
                }
                2 if !v.is_empty() => {
                    let i = rng.below(v.len());
                    v[i] = rng.next() as u8;
                }
                3 => {
                    // Duplicate a chunk (repetition finds quadratic paths and state bugs).
                    let end = (at + rng.below(32)).min(v.len());
                    let chunk = v[at.min(end)..end].to_vec();
                    v.splice(at..at, chunk);
                }
                _ => v.extend((0..rng.below(8)).map(|_| rng.next() as u8)),
            }
        }
        v
    }

    /// The PRNG seed: fixed, so a failure reproduces.
    const SEED: u64 = 0x1b_b01d_5eed;

    /// Run `check` on `n` inputs derived from `seeds` (and on the seeds themselves).
    fn property(seeds: &[&[u8]], n: usize, mut check: impl FnMut(&[u8])) {
        let mut rng = Rng(SEED);
        for seed in seeds {
            check(seed);
        }
        for _ in 0..n {
            let seed = seeds[rng.below(seeds.len())];
            let input: Vec<u8> = if rng.below(8) == 0 {
                (0..rng.below(64)).map(|_| rng.next() as u8).collect()
            } else {
                mutate(&mut rng, seed)
            };
            check(&input);
        }
    }

    fn lossy(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn spec_parser_never_panics() {
        let seeds: &[&[u8]] = &[
            include_bytes!("../../build-specs/hello.toml"),
            b"platforms = [\"linux/amd64\"]\n[[layer]]\nfiles = [{ src = \"a\", dest = \"/a\", mode = \"0644\", uid = 1 }]\n",
            b"[config]\nlabels = { a = \"b\" }\nexposed_ports = [80, \"53/udp\"]\nenv = { A = \"1\" }\n",
            b"repository = \"127.0.0.1:5000/a/b\"\ntags = [\"v1\", \"latest\"]\n",
        ];
        property(seeds, 3000, |input| super::spec(&lossy(input)));
    }

    #[test]
    fn challenge_parser_never_panics() {
        let seeds: &[&[u8]] = &[
            br#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull,push""#,
            br#"Basic realm="a, \"b\"", Bearer realm=https://t/x ,scope="s""#,
            b"Negotiate abc==, Basic",
            br#"BEARER  Realm = https://t.example/token , Service=reg"#,
        ];
        property(seeds, 3000, |input| {
            let text = lossy(input);
            let mut mid = text.len() / 2;
            while !text.is_char_boundary(mid) {
                mid += 1;
            }
            let (a, b) = text.split_at(mid);
            super::challenges(&[&text]);
            super::challenges(&[a, b]);
        });
    }

    #[test]
    fn response_parsers_never_panic() {
        let bodies: &[&[u8]] = &[
            br#"{"errors":[{"code":"DIGEST_INVALID","message":"provided digest did not match uploaded content","detail":{}}]}"#,
            br#"{"errors":[]}"#,
            b"<html><body><h1>502 Bad Gateway</h1></body></html>",
            b"",
        ];
        property(bodies, 3000, |input| {
            super::error_body(input, false);
            super::error_body(input, true);
        });
        let locations: &[&[u8]] = &[
            b"/v2/team/app/blobs/uploads/123?_state=a%2Bb",
            b"https://uploads.example.net/put/123?sig=x&digest=old",
            b"123",
            b"http://[::1]:5000/v2/a/blobs/uploads/x",
        ];
        property(locations, 3000, |input| super::location(&lossy(input)));
        let dates: &[&[u8]] = &[b"Sun, 06 Nov 1994 08:49:37 GMT", b"120", b"0"];
        property(dates, 2000, |input| super::retry_after(&lossy(input)));
    }
}
