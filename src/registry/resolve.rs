//! `--resolve HOST:PORT:ADDR[,ADDR...]`: reach a registry host name at given addresses without
//! DNS, curl's convention (curl(1) `--resolve`). TLS is still verified against HOST: only the
//! address lookup changes (reqwest `ClientBuilder::resolve_to_addrs`). Users need it for
//! split-horizon DNS; the tests use it to reach a local ECR stand-in.
//!
//! reqwest resolves names without ports, so the override applies to HOST whatever port a URL
//! names; PORT is still required (curl's syntax) and the connection goes to the URL's port.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// One `--resolve` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveOverride {
    /// The host name, lowercase.
    pub host: String,
    pub port: u16,
    /// Where to connect instead (with `port`).
    pub addrs: Vec<SocketAddr>,
}

/// A `--resolve` value that is not `HOST:PORT:ADDR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--resolve {input:?}: {reason} (expected HOST:PORT:ADDR, e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com:443:10.0.0.5)"
)]
pub struct ResolveParseError {
    input: String,
    reason: &'static str,
}

impl FromStr for ResolveOverride {
    type Err = ResolveParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ResolveParseError {
            input: input.to_string(),
            reason,
        };
        let (host, rest) = input.split_once(':').ok_or_else(|| err("no port"))?;
        let (port, addrs) = rest.split_once(':').ok_or_else(|| err("no address"))?;
        let valid_host = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !valid_host {
            return Err(err("HOST must be a host name"));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err("PORT must be a number from 1 to 65535"))?;
        let mut out = Vec::new();
        for addr in addrs.split(',') {
            // IPv6 in brackets, as curl writes it: [::1].
            let bare = addr
                .strip_prefix('[')
                .and_then(|a| a.strip_suffix(']'))
                .unwrap_or(addr);
            let ip: IpAddr = bare
                .parse()
                .map_err(|_| err("ADDR must be an IP address (IPv6 in brackets)"))?;
            out.push(SocketAddr::new(ip, port));
        }
        Ok(ResolveOverride {
            host: host.to_ascii_lowercase(),
            port,
            addrs: out,
        })
    }
}

impl fmt::Display for ResolveOverride {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addrs: Vec<String> = self
            .addrs
            .iter()
            .map(|a| match a.ip() {
                IpAddr::V6(ip) => format!("[{ip}]"),
                IpAddr::V4(ip) => ip.to_string(),
            })
            .collect();
        write!(f, "{}:{}:{}", self.host, self.port, addrs.join(","))
    }
}

/// Apply the overrides to a reqwest client builder.
pub(crate) fn apply(
    mut builder: reqwest::ClientBuilder,
    overrides: &[ResolveOverride],
) -> reqwest::ClientBuilder {
    for o in overrides {
        builder = builder.resolve_to_addrs(&o.host, &o.addrs);
    }
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let sa = |s: &str| s.parse::<SocketAddr>().expect("socket address");
        /// (input, Some((host, port, addresses)) when valid)
        type Case<'a> = (&'a str, Option<(&'a str, u16, Vec<SocketAddr>)>);
        let cases: Vec<Case> = vec![
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com:5443:127.0.0.1",
                Some((
                    "123456789012.dkr.ecr.us-east-1.amazonaws.com",
                    5443,
                    vec![sa("127.0.0.1:5443")],
                )),
            ),
            (
                "Reg.Example.com:443:[::1],10.0.0.2",
                Some((
                    "reg.example.com",
                    443,
                    vec![sa("[::1]:443"), sa("10.0.0.2:443")],
                )),
            ),
            (
                "reg.example.com:443:::1",
                Some(("reg.example.com", 443, vec![sa("[::1]:443")])),
            ),
            ("reg.example.com", None),
            ("reg.example.com:443", None),
            ("reg.example.com:0:127.0.0.1", None),
            ("reg.example.com:99999:127.0.0.1", None),
            ("reg.example.com:https:127.0.0.1", None),
            ("reg.example.com:443:not-an-ip", None),
            ("reg.example.com:443:", None),
            (":443:127.0.0.1", None),
            ("a/b:443:127.0.0.1", None),
        ];
        for (input, want) in cases {
            let got = input.parse::<ResolveOverride>().ok();
            let want = want.map(|(host, port, addrs)| ResolveOverride {
                host: host.into(),
                port,
                addrs,
            });
            assert_eq!(got, want, "{input}");
        }
        let e = "x".parse::<ResolveOverride>().expect_err("invalid");
        assert!(e.to_string().contains("HOST:PORT:ADDR"), "{e}");
        let ok: ResolveOverride = "h.example:1:[::1],127.0.0.1".parse().expect("valid");
        assert_eq!(ok.to_string(), "h.example:1:[::1],127.0.0.1");
    }
}
