//! Shell-style file-name globs, as operators write them in `maintenance.patterns`:
//! `*` (any run of characters), `?` (one character), `[abc]`, `[a-z]`, `[!a-z]`.
//! No `**` and no braces: a pattern matches a name, or the path inside a dir, as a
//! plain string (`*` crosses `/`). Pure: no file system.

/// Whether `pattern` is well formed: every `[` is closed.
pub fn check(pattern: &str) -> Result<(), String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '[' {
            i = class_end(&chars, i).ok_or_else(|| "an unclosed `[`".to_owned())?;
        }
        i += 1;
    }
    Ok(())
}

/// Whether `text` matches `pattern` entirely (a malformed pattern matches nothing).
pub fn matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matching with one backtrack point for the last `*`: linear in
    // practice, no recursion on hostile names.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
                continue;
            }
            Some('?') => Some(pi + 1),
            Some('[') => match class_end(&p, pi) {
                Some(end) if class_matches(&p[pi + 1..end], t[ti]) => Some(end + 1),
                Some(_) => None,
                None => return false,
            },
            Some(c) if *c == t[ti] => Some(pi + 1),
            _ => None,
        };
        match (step, star) {
            (Some(next), _) => {
                pi = next;
                ti += 1;
            }
            (None, Some((star_p, star_t))) => {
                pi = star_p + 1;
                ti = star_t + 1;
                star = Some((star_p, star_t + 1));
            }
            (None, None) => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The index of the `]` closing the class opened at `open` (a `]` right after `[`
/// or `[!` is a member, as in the shell).
fn class_end(p: &[char], open: usize) -> Option<usize> {
    let mut i = open + 1;
    if p.get(i) == Some(&'!') {
        i += 1;
    }
    if p.get(i) == Some(&']') {
        i += 1;
    }
    (i..p.len()).find(|&j| p[j] == ']')
}

fn class_matches(class: &[char], c: char) -> bool {
    let (negated, class) = match class.split_first() {
        Some(('!', rest)) => (true, rest),
        _ => (false, class),
    };
    let mut i = 0;
    let mut found = false;
    while i < class.len() {
        if i + 2 < class.len() && class[i + 1] == '-' {
            found |= class[i] <= c && c <= class[i + 2];
            i += 3;
        } else {
            found |= class[i] == c;
            i += 1;
        }
    }
    found != negated
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_the_shell_does() {
        let cases: &[(&str, &str, bool)] = &[
            ("*.log", "app.log", true),
            ("*.log", "app.log.1", false),
            ("*.log", ".log", true),
            ("*.log.[0-9]*", "app.log.1", true),
            ("*.log.[0-9]*", "app.log.12.gz", true),
            ("*.log.[0-9]*", "app.log.x", false),
            ("core", "core", true),
            ("core", "corex", false),
            ("core.*", "core.1234", true),
            ("*.dump", "db.dump", true),
            ("*.dump", "app.db", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("[!a-c]x", "dx", true),
            ("[!a-c]x", "bx", false),
            ("[]]", "]", true),
            ("*a*b*c", "xxaxxbxxc", true),
            ("*a*b*c", "xxaxxbxxcd", false),
            ("sub/*.log", "sub/a.log", true),
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("[a-", "[a-", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(matches(pattern, text), *expected, "{pattern} vs {text}");
        }
        assert!(check("*.log.[0-9]*").is_ok());
        assert_eq!(check("x[ab"), Err("an unclosed `[`".to_owned()));
    }
}
