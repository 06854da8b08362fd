//! Type checks of a base image's config before it is merged into ours (image-spec config.md,
//! "Properties"): a base whose config has, say, `Cmd` as a string, a `history[].created` that
//! is not an RFC 3339 date or a non-object `config` would otherwise be copied into an image no
//! runtime or skopeo can parse. What the spec does not allow is refused (the caller reports it
//! as an input error, exit 3); unknown fields are left alone (the spec allows extensions).

use serde_json::Value;

/// Check the types of the fields image-spec config.md defines; the first problem, as
/// `field: what is wrong`.
pub fn validate(config: &Value) -> Result<(), String> {
    let Some(top) = config.as_object() else {
        return Err("the config is not a JSON object".into());
    };
    for key in ["architecture", "os", "variant", "author", "os.version"] {
        opt_string(top.get(key), key)?;
    }
    if let Some(v) = top.get("created") {
        date(v, "created")?;
    }
    if let Some(c) = top.get("config").filter(|v| !v.is_null()) {
        let Some(c) = c.as_object() else {
            return Err(format!("config: {} instead of an object", kind(c)));
        };
        for key in ["User", "WorkingDir", "StopSignal"] {
            opt_string(c.get(key), &format!("config.{key}"))?;
        }
        for key in ["Env", "Entrypoint", "Cmd", "OnBuild", "Shell"] {
            opt_strings(c.get(key), &format!("config.{key}"))?;
        }
        for key in ["ExposedPorts", "Volumes"] {
            opt_object(c.get(key), &format!("config.{key}"))?;
        }
        if let Some(labels) = c.get("Labels").filter(|v| !v.is_null()) {
            let Some(labels) = labels.as_object() else {
                return Err(format!(
                    "config.Labels: {} instead of an object",
                    kind(labels)
                ));
            };
            for (k, v) in labels {
                if !v.is_string() {
                    return Err(format!(
                        "config.Labels.{k}: {} instead of a string",
                        kind(v)
                    ));
                }
            }
        }
        if let Some(v) = c
            .get("ArgsEscaped")
            .filter(|v| !v.is_null() && !v.is_boolean())
        {
            return Err(format!(
                "config.ArgsEscaped: {} instead of a boolean",
                kind(v)
            ));
        }
    }
    if let Some(h) = top.get("history").filter(|v| !v.is_null()) {
        let Some(h) = h.as_array() else {
            return Err(format!("history: {} instead of an array", kind(h)));
        };
        for (i, entry) in h.iter().enumerate() {
            let Some(e) = entry.as_object() else {
                return Err(format!(
                    "history[{i}]: {} instead of an object",
                    kind(entry)
                ));
            };
            if let Some(v) = e.get("created") {
                date(v, &format!("history[{i}].created"))?;
            }
            for key in ["author", "created_by", "comment"] {
                opt_string(e.get(key), &format!("history[{i}].{key}"))?;
            }
            if let Some(v) = e.get("empty_layer").filter(|v| !v.is_boolean()) {
                return Err(format!(
                    "history[{i}].empty_layer: {} instead of a boolean",
                    kind(v)
                ));
            }
        }
    }
    let rootfs = top.get("rootfs").ok_or("rootfs: missing")?;
    if rootfs["type"] != "layers" {
        return Err("rootfs.type: must be \"layers\"".into());
    }
    let ids = rootfs["diff_ids"]
        .as_array()
        .ok_or("rootfs.diff_ids: missing or not an array")?;
    for (i, id) in ids.iter().enumerate() {
        if id
            .as_str()
            .and_then(|s| s.parse::<crate::digest::Digest>().ok())
            .is_none()
        {
            return Err(format!("rootfs.diff_ids[{i}]: not a sha256 digest"));
        }
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn opt_string(v: Option<&Value>, field: &str) -> Result<(), String> {
    match v {
        Some(v) if !v.is_string() && !v.is_null() => {
            Err(format!("{field}: {} instead of a string", kind(v)))
        }
        _ => Ok(()),
    }
}

fn opt_object(v: Option<&Value>, field: &str) -> Result<(), String> {
    match v {
        Some(v) if !v.is_object() && !v.is_null() => {
            Err(format!("{field}: {} instead of an object", kind(v)))
        }
        _ => Ok(()),
    }
}

fn opt_strings(v: Option<&Value>, field: &str) -> Result<(), String> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(items)) => match items.iter().position(|i| !i.is_string()) {
            Some(i) => Err(format!(
                "{field}[{i}]: {} instead of a string",
                kind(&items[i])
            )),
            None => Ok(()),
        },
        Some(v) => Err(format!(
            "{field}: {} instead of an array of strings",
            kind(v)
        )),
    }
}

/// An RFC 3339 date-time (config.md: "combined date and time ... RFC 3339, section 5.6").
fn date(v: &Value, field: &str) -> Result<(), String> {
    let ok = v.as_str().is_some_and(is_rfc3339);
    if ok {
        Ok(())
    } else {
        let shown = match v.as_str() {
            Some(s) => format!("\"{}\"", crate::untrusted::shown(s, 40)),
            None => kind(v).to_string(),
        };
        Err(format!("{field}: {shown} is not an RFC 3339 date-time"))
    }
}

/// `YYYY-MM-DD(T|t| )HH:MM:SS(.F+)?(Z|z|(+|-)HH:MM)`.
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || !matches!(b[10], b'T' | b't' | b' ')
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    let rest = &b[i..];
    let two = |x: &[u8]| x.len() == 2 && x.iter().all(u8::is_ascii_digit);
    let num = |x: &[u8]| {
        std::str::from_utf8(x)
            .ok()
            .and_then(|t| t.parse::<u32>().ok())
    };
    let in_range = num(&b[5..7]).is_some_and(|m| (1..=12).contains(&m))
        && num(&b[8..10]).is_some_and(|d| (1..=31).contains(&d))
        && num(&b[11..13]).is_some_and(|h| h < 24)
        && num(&b[14..16]).is_some_and(|m| m < 60)
        && num(&b[17..19]).is_some_and(|s| s <= 60);
    in_range
        && (rest == b"Z"
            || rest == b"z"
            || (rest.len() == 6
                && matches!(rest[0], b'+' | b'-')
                && two(&rest[1..3])
                && rest[3] == b':'
                && two(&rest[4..6])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architecture": "amd64", "os": "linux",
            "created": "2024-01-02T03:04:05.123456789Z",
            "config": {"Env": ["A=1"], "Cmd": ["sh"], "Labels": {"a": "b"}, "ExposedPorts": {"80/tcp": {}}},
            "history": [{"created": "2024-01-02T03:04:05+01:00", "created_by": "x", "empty_layer": true}],
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "a".repeat(64))]}
        })
    }

    #[test]
    fn what_the_spec_does_not_allow_is_refused() {
        assert_eq!(validate(&base()), Ok(()));
        let mut null_config = base();
        null_config["config"] = Value::Null;
        assert_eq!(validate(&null_config), Ok(()));
        let cases: &[(&str, Value, &str)] = &[
            (
                "/created",
                json!("yesterday"),
                "created: \"yesterday\" is not an RFC 3339",
            ),
            (
                "/history/0/created",
                json!("2024-13-01T00:00:00Z"),
                "history[0].created",
            ),
            (
                "/history/0/created",
                json!(1700000000),
                "history[0].created: a number",
            ),
            (
                "/config/Cmd",
                json!("sh -c x"),
                "config.Cmd: a string instead of an array",
            ),
            (
                "/config/Entrypoint",
                json!([1]),
                "config.Entrypoint[0]: a number",
            ),
            (
                "/config",
                json!("x"),
                "config: a string instead of an object",
            ),
            (
                "/config/Labels",
                json!({"a": 1}),
                "config.Labels.a: a number",
            ),
            ("/config/Env", json!({"A": "1"}), "config.Env: an object"),
            ("/config/User", json!(0), "config.User: a number"),
            ("/history", json!({}), "history: an object"),
            (
                "/history/0/empty_layer",
                json!("yes"),
                "history[0].empty_layer",
            ),
            ("/rootfs/diff_ids/0", json!("abc"), "rootfs.diff_ids[0]"),
            ("/os", json!(["linux"]), "os: an array"),
        ];
        for (pointer, value, want) in cases {
            let mut c = base();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            match c.pointer_mut(parent).unwrap() {
                Value::Array(a) => a[key.parse::<usize>().unwrap()] = value.clone(),
                other => other[key] = value.clone(),
            }
            let err = validate(&c).unwrap_err();
            assert!(err.contains(want), "{pointer} = {value}: {err}");
        }
        assert!(validate(&json!([1])).is_err());
    }

    #[test]
    fn rfc3339_dates() {
        for ok in [
            "2024-01-02T03:04:05Z",
            "2024-01-02t03:04:05.5+05:30",
            "1970-01-01 00:00:00-00:00",
        ] {
            assert!(is_rfc3339(ok), "{ok}");
        }
        for bad in [
            "2024-01-02",
            "2024-01-02T03:04:05",
            "2024-01-02T03:04:05.Z",
            "2024-01-02T25:04:05Z",
            "x024-01-02T03:04:05Z",
            "2024-01-02T03:04:05+0530",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }
}
