//! Target platforms (`os/arch[/variant]`), the path placeholders they expand, and the ELF
//! machine type each one must carry.
//!
//! Names follow the OCI image-index `platform` object (image-spec image-index.md), whose
//! values are Go's GOOS/GOARCH; `uname_m` is the kernel's name, which Rust target triples use.

use std::fmt;
use std::str::FromStr;

/// One `os/arch[/variant]` target.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

/// Why a platform string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid platform {input:?}: {reason}; supported: {}", SUPPORTED.join(", "))]
pub struct PlatformParseError {
    pub input: String,
    pub reason: &'static str,
}

/// The platforms we can check and build. Others fail early: we could not check their
/// artifacts' ELF machine type, and no scratch image for them is tested.
pub const SUPPORTED: &[&str] = &["linux/amd64", "linux/arm64", "linux/arm/v7", "linux/arm/v6"];

/// ELF `e_machine` values (System V gABI, "Machine" table).
pub const EM_386: u16 = 3;
pub const EM_ARM: u16 = 40;
pub const EM_X86_64: u16 = 62;
pub const EM_AARCH64: u16 = 183;

impl Platform {
    pub fn new(os: &str, arch: &str, variant: Option<&str>) -> Self {
        Platform {
            os: os.into(),
            arch: arch.into(),
            variant: variant.map(Into::into),
        }
    }

    /// The default target list: what EKS nodes run (x86-64 and Graviton).
    pub fn defaults() -> Vec<Platform> {
        vec![
            Platform::new("linux", "amd64", None),
            Platform::new("linux", "arm64", None),
        ]
    }

    /// `uname -m` for this platform: `x86_64`, `aarch64`, `armv7l`, `armv6l`.
    pub fn uname_m(&self) -> &'static str {
        match (self.arch.as_str(), self.variant.as_deref()) {
            ("amd64", _) => "x86_64",
            ("arm64", _) => "aarch64",
            ("arm", Some("v6")) => "armv6l",
            ("arm", _) => "armv7l",
            _ => "unknown",
        }
    }

    /// The ELF machine type artifacts for this platform must have.
    pub fn elf_machine(&self) -> Option<u16> {
        match self.arch.as_str() {
            "amd64" => Some(EM_X86_64),
            "arm64" => Some(EM_AARCH64),
            "arm" => Some(EM_ARM),
            "386" => Some(EM_386),
            _ => None,
        }
    }

    /// The ELF class (32/64-bit) artifacts for this platform must have.
    pub fn elf_is_64(&self) -> bool {
        matches!(self.arch.as_str(), "amd64" | "arm64")
    }

    /// Expand `{os}`, `{arch}`, `{variant}` and `{uname_m}` in `template`.
    /// Unknown `{...}` names are left alone; the spec parser rejects them earlier.
    pub fn expand(&self, template: &str) -> String {
        template
            .replace("{os}", &self.os)
            .replace("{arch}", &self.arch)
            .replace("{variant}", self.variant.as_deref().unwrap_or(""))
            .replace("{uname_m}", self.uname_m())
    }
}

/// Parse a `--platform` list: blank items are skipped, each item is normalised, and a platform
/// named twice (also through an alias: `linux/arm64/v8` is `linux/arm64`) is refused, as the
/// spec's `platforms` are; an index must not list one platform twice.
pub fn parse_list<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Vec<Platform>, String> {
    let mut out: Vec<(Platform, &str)> = Vec::new();
    for item in items.into_iter().map(str::trim).filter(|i| !i.is_empty()) {
        let p: Platform = item
            .parse()
            .map_err(|e: PlatformParseError| e.to_string())?;
        if let Some((_, first)) = out.iter().find(|(q, _)| *q == p) {
            return Err(if *first == item {
                format!("{p} is listed twice")
            } else {
                format!("{first} and {item} are the same platform ({p}); name it once")
            });
        }
        out.push((p, item));
    }
    if out.is_empty() {
        return Err("empty list; name at least one, e.g. linux/amd64".into());
    }
    Ok(out.into_iter().map(|(p, _)| p).collect())
}

/// Placeholders a `src` may contain.
pub const PLACEHOLDERS: &[&str] = &["{os}", "{arch}", "{variant}", "{uname_m}"];

/// Human name of an ELF machine type, for error messages.
pub fn elf_machine_name(machine: u16) -> String {
    match machine {
        EM_X86_64 => "x86-64".into(),
        EM_AARCH64 => "AArch64".into(),
        EM_ARM => "ARM".into(),
        EM_386 => "Intel 80386".into(),
        8 => "MIPS".into(),
        20 => "PowerPC".into(),
        21 => "PowerPC64".into(),
        22 => "IBM S/390".into(),
        243 => "RISC-V".into(),
        other => format!("machine type {other}"),
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = PlatformParseError;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| PlatformParseError {
            input: input.to_string(),
            reason,
        };
        let parts: Vec<&str> = input.split('/').collect();
        let (os, arch, variant) = match parts.as_slice() {
            [os, arch] => (*os, *arch, None),
            [os, arch, variant] => (*os, *arch, Some(*variant)),
            _ => return Err(err("expected os/arch or os/arch/variant")),
        };
        if os != "linux" {
            return Err(err("only linux images are supported"));
        }
        // Normalise the spellings containerd accepts (platforms.Normalize) so that
        // `linux/x86_64` or `linux/aarch64` mean what users expect.
        let (arch, variant) = match (arch, variant) {
            ("amd64" | "x86_64" | "x86-64", None) => ("amd64", None),
            ("arm64" | "aarch64", None | Some("v8")) => ("arm64", None),
            ("arm" | "armhf", None | Some("v7")) => ("arm", Some("v7")),
            ("arm" | "armel", Some("v6")) => ("arm", Some("v6")),
            ("amd64" | "arm64", Some(_)) => {
                return Err(err("this architecture takes no variant here"));
            }
            ("arm", Some(_)) => return Err(err("arm variants are v6 and v7")),
            _ => return Err(err("unknown architecture")),
        };
        Ok(Platform::new(os, arch, variant))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases = [
            ("linux/amd64", Some("linux/amd64")),
            ("linux/x86_64", Some("linux/amd64")),
            ("linux/arm64", Some("linux/arm64")),
            ("linux/arm64/v8", Some("linux/arm64")),
            ("linux/aarch64", Some("linux/arm64")),
            ("linux/arm/v7", Some("linux/arm/v7")),
            ("linux/arm", Some("linux/arm/v7")),
            ("linux/arm/v6", Some("linux/arm/v6")),
            ("windows/amd64", None),
            ("linux/sparc", None),
            ("linux", None),
            ("linux/amd64/v2/x", None),
            ("linux/arm/v5", None),
            ("", None),
        ];
        for (input, want) in cases {
            let got = input.parse::<Platform>().ok().map(|p| p.to_string());
            assert_eq!(got.as_deref(), want, "{input}");
        }
    }

    #[test]
    fn list_table() {
        let cases: [(&[&str], Result<&str, &str>); 6] = [
            (
                &["linux/amd64", "linux/arm64"],
                Ok("linux/amd64 linux/arm64"),
            ),
            (
                &["linux/amd64", " ", "linux/arm/v7"],
                Ok("linux/amd64 linux/arm/v7"),
            ),
            (
                &["linux/amd64", "linux/amd64"],
                Err("linux/amd64 is listed twice"),
            ),
            (
                &["linux/arm64/v8", "linux/arm64"],
                Err(
                    "linux/arm64/v8 and linux/arm64 are the same platform (linux/arm64); name it once",
                ),
            ),
            (
                &["linux/x86_64", "linux/amd64"],
                Err("are the same platform (linux/amd64)"),
            ),
            (&["", " "], Err("empty list")),
        ];
        for (input, want) in cases {
            let got = parse_list(input.iter().copied()).map(|l| {
                l.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            });
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{input:?}"),
                (Err(g), Err(w)) => assert!(g.contains(w), "{input:?}: {g}"),
                (g, w) => panic!("{input:?}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn placeholders() {
        let t = "target/{uname_m}-unknown-{os}-musl/{arch}{variant}";
        let cases = [
            ("linux/amd64", "target/x86_64-unknown-linux-musl/amd64"),
            ("linux/arm64", "target/aarch64-unknown-linux-musl/arm64"),
            ("linux/arm/v7", "target/armv7l-unknown-linux-musl/armv7"),
        ];
        for (p, want) in cases {
            assert_eq!(p.parse::<Platform>().unwrap().expand(t), want);
        }
    }
}
