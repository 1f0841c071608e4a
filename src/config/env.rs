//! `${VAR}` in config values: secrets stay in the environment, not in the file.
//! Kept apart from the sections because both the config (`check_environment`) and
//! the flag store (opening its URL) expand the same way.

use std::fmt::Write as _;

/// Replaces each `${NAME}` in `s` with the environment variable NAME, percent-encoded
/// so a password with `@` or `/` cannot break the URL. A missing variable is an error.
pub fn expand_env(s: &str) -> Result<String, String> {
    expand_with(s, |name| std::env::var(name).ok())
}

fn expand_with(s: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{s}`"))?;
        let name = &after[..end];
        let value =
            lookup(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        for b in value.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion_percent_encodes() {
        let lookup = |name: &str| (name == "PW").then(|| "p@ss/w:rd%".to_owned());
        assert_eq!(
            expand_with("redis://:${PW}@h:1/0", lookup).unwrap(),
            "redis://:p%40ss%2Fw%3Ard%25@h:1/0"
        );
        assert_eq!(
            expand_with("redis://h:1/0", lookup).unwrap(),
            "redis://h:1/0"
        );
        assert_eq!(
            expand_with("redis://:${NOPE}@h", lookup).unwrap_err(),
            "environment variable NOPE is not set"
        );
        assert!(expand_with("redis://${PW", lookup).is_err());
    }
}
