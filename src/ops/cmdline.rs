//! Other users' command lines, as they may leave the host in an alert or a log line.
//!
//! A command line is someone else's data: `mysql -pS3CRET`, `curl --token ...`, and
//! anything the process's owner chose to put there, newlines included (a newline in
//! an argument would otherwise forge a line of the doctor's audit log). The doctor's
//! alerts and the proxy's CPU/memory spike alerts both show processes, so both go
//! through [`sanitize`]: the executable and at most [`MAX_ARGS`] arguments, values
//! of `-p*`, `--password*` and anything naming a token or a secret replaced by
//! [`REDACTED`], control characters escaped, each argument cut to [`MAX_ARG_CHARS`].
//! A pure function, table-tested below.

use std::fmt::Write as _;

/// Arguments shown after the executable; the rest are counted, not shown.
pub const MAX_ARGS: usize = 4;
/// Characters shown of one argument (an argument is cut after this, with `…`).
pub const MAX_ARG_CHARS: usize = 64;
/// What a redacted value reads as.
pub const REDACTED: &str = "<redacted>";

/// The command line `argv` as it may be shown: see the module docs.
pub fn sanitize<S: AsRef<str>>(argv: &[S]) -> String {
    let Some((exe, args)) = argv.split_first() else {
        return String::new();
    };
    let mut out = shown(exe.as_ref());
    // Set by a flag whose value is the next argument (`-p SECRET`, `--token X`).
    let mut value_next = false;
    for arg in args.iter().take(MAX_ARGS) {
        let arg = arg.as_ref();
        out.push(' ');
        if std::mem::take(&mut value_next) && !arg.starts_with('-') {
            out.push_str(REDACTED);
            continue;
        }
        match secret_split(arg) {
            Secret::No => out.push_str(&shown(arg)),
            Secret::Inline(keep) => {
                out.push_str(&shown(keep));
                out.push_str(REDACTED);
            }
            Secret::Whole => out.push_str(REDACTED),
            Secret::Next => {
                out.push_str(&shown(arg));
                value_next = true;
            }
        }
    }
    if args.len() > MAX_ARGS {
        let _ = write!(out, " … (+{} more)", args.len() - MAX_ARGS);
    }
    out
}

/// One name (a `comm`, a user) as it may be shown: control characters escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// How one argument carries a secret, if it does.
#[derive(Debug, PartialEq, Eq)]
enum Secret<'a> {
    No,
    /// `-pVALUE`, `--password=VALUE`, `API_TOKEN=VALUE`: keep this prefix.
    Inline(&'a str),
    /// The flag's value is the next argument (`-p`, `--password`, `--token`).
    Next,
    /// No flag and no `=`, but it names a token or a secret: all of it.
    Whole,
}

fn secret_split(arg: &str) -> Secret<'_> {
    // `-p*` (one dash): mysql's `-pPASSWORD` and its family.
    if let Some(value) = arg.strip_prefix("-p")
        && !arg.starts_with("--")
    {
        return if value.is_empty() {
            Secret::Next
        } else {
            Secret::Inline("-p")
        };
    }
    let lower = arg.to_ascii_lowercase();
    let names_secret = lower.starts_with("--password")
        || lower.contains("token")
        || lower.contains("secret")
        || lower.contains("passwd");
    if !names_secret {
        return Secret::No;
    }
    match arg.find('=') {
        Some(at) => Secret::Inline(&arg[..=at]),
        None if arg.starts_with('-') => Secret::Next,
        None => Secret::Whole,
    }
}

/// `text` with control characters escaped, cut to [`MAX_ARG_CHARS`].
fn shown(text: &str) -> String {
    let mut out = escape(&text.chars().take(MAX_ARG_CHARS).collect::<String>());
    if text.chars().nth(MAX_ARG_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_control_characters_escaped_and_the_line_cut() {
        let long = "x".repeat(80);
        let cut = format!("{}…", "x".repeat(64));
        let table: &[(&[&str], &str)] = &[
            (&[], ""),
            (&["yes"], "yes"),
            (
                &["mysql", "-uapp", "-pS3CRET", "db"],
                "mysql -uapp -p<redacted> db",
            ),
            (&["mysql", "-p", "S3CRET", "db"], "mysql -p <redacted> db"),
            (
                &["app", "--password=hunter2", "--password-file", "/run/p"],
                "app --password=<redacted> --password-file <redacted>",
            ),
            (
                &["app", "--api-token", "abc", "-v"],
                "app --api-token <redacted> -v",
            ),
            // A flag after a value-taking flag is not its value.
            (&["app", "--token", "--verbose"], "app --token --verbose"),
            (
                &["curl", "https://x/?access_token=abc", "-H", "X-Secret: s"],
                "curl https://x/?access_token=<redacted> -H <redacted>",
            ),
            (
                &["env", "CLIENT_SECRET=s3", "run"],
                "env CLIENT_SECRET=<redacted> run",
            ),
            (&["tool", "mysecretvalue"], "tool <redacted>"),
            (&["Tool", "--TOKEN=a"], "Tool --TOKEN=<redacted>"),
            // A newline would forge a log line: escaped, as other control characters.
            (
                &["sh", "a\nlevel=ERROR doctor acted", "b\tc\u{1b}[31m"],
                "sh a\\nlevel=ERROR doctor acted b\\tc\\u{1b}[31m",
            ),
            (&["a\\b"], "a\\\\b"),
            (
                &["bin", "1", "2", "3", "4", "5", "6"],
                "bin 1 2 3 4 … (+2 more)",
            ),
            (&["bin", &long], &format!("bin {cut}")),
            // `-p` past the shown arguments is not shown at all.
            (
                &["bin", "1", "2", "3", "4", "-pS3CRET"],
                "bin 1 2 3 4 … (+1 more)",
            ),
        ];
        for (argv, want) in table {
            assert_eq!(sanitize(argv), *want, "{argv:?}");
        }
    }

    #[test]
    fn names_are_escaped() {
        assert_eq!(escape("yes"), "yes");
        assert_eq!(escape("a\nb\r"), "a\\nb\\r");
    }
}
