//! Text from outside (a registry's answer or headers, a base image's JSON) on its way into an
//! error message or log line: control characters are escaped (a newline would forge a second
//! log line, an ANSI escape repaints the terminal, bidirectional overrides reorder what is
//! shown) and the length is bounded (every error is one readable line, whatever a server
//! sends). Every place that prints server text goes through [`shown`].

/// How many characters of one piece of server text an error shows by default.
pub const MAX_SHOWN: usize = 200;

/// `text` with control and bidirectional-override characters escaped (`\n`, `\u{1b}`), cut
/// after `max` characters with a note of how many were left out.
pub fn shown(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count >= max {
            let rest = text.chars().count() - count;
            out.push_str(&format!("… ({rest} more characters)"));
            break;
        }
        if c.is_control() || is_bidi_control(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A list of server-provided items, each [`shown`] with `max_each` characters, at most
/// `max_items` of them, joined with ", ".
pub fn shown_list<S: AsRef<str>>(items: &[S], max_items: usize, max_each: usize) -> String {
    let mut parts: Vec<String> = items
        .iter()
        .take(max_items)
        .map(|s| shown(s.as_ref(), max_each))
        .collect();
    if items.len() > max_items {
        parts.push(format!("and {} more", items.len() - max_items));
    }
    parts.join(", ")
}

/// Unicode's explicit directional formatting characters (UAX #9): not `is_control`, but they
/// change the order in which the rest of the line is displayed.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_length_bounded() {
        let cases = [
            ("linux/amd64", 200, "linux/amd64"),
            ("a\nb", 200, "a\\nb"),
            ("\u{1b}[31mred", 200, "\\u{1b}[31mred"),
            ("x\u{202E}y", 200, "x\\u{202e}y"),
            ("é日本", 200, "é日本"),
            ("abcdef", 3, "abc… (3 more characters)"),
            ("", 5, ""),
        ];
        for (input, max, want) in cases {
            assert_eq!(shown(input, max), want, "{input:?}");
        }
        let long = "z".repeat(60_000);
        assert!(shown(&long, MAX_SHOWN).len() < 300);
    }

    #[test]
    fn lists_are_bounded_too() {
        let items: Vec<String> = (0..5000).map(|i| format!("linux/a{i}\n")).collect();
        let s = shown_list(&items, 3, 20);
        assert_eq!(s, "linux/a0\\n, linux/a1\\n, linux/a2\\n, and 4997 more");
        assert_eq!(shown_list::<&str>(&[], 3, 20), "");
    }
}
