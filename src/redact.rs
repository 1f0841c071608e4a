//! What may leave the process in clear: URLs without their secrets.
//!
//! URLs carry credentials in two places an operator does not think of as "the
//! secret": the userinfo (`redis://:password@host`, `https://user:pass@dav`) and the
//! query (`?token=...`, `?sentinel_password=...`). Every URL that goes into a log
//! line, an error or an alert passes through [`url`] (one URL) or [`urls_in`] (the
//! text of another library's error). A secret in a URL's *path* (chat webhooks) is
//! not recognisable: such URLs come from the environment (`url_env`) and are never
//! printed at all.

/// The text that replaces a secret.
pub const MASK: &str = "***";

/// `url` with its userinfo and its query values masked: `redis://***@host:6379/0`,
/// `https://h/p?token=***&a=***`. Text that is not a URL comes back as is.
pub fn url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..rest_start]);
    match authority.rfind('@') {
        Some(at) => {
            out.push_str(MASK);
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let after = &rest[authority_len..];
    let (before_fragment, fragment) = after.split_at(after.find('#').unwrap_or(after.len()));
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let masked: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) => format!("{key}={MASK}"),
                    None if pair.is_empty() => String::new(),
                    None => MASK.to_owned(),
                })
                .collect();
            out.push_str(&masked.join("&"));
        }
        None => out.push_str(before_fragment),
    }
    out.push_str(fragment);
    out
}

/// `text` with every URL in it (a `scheme://` run up to whitespace or a quote or
/// bracket, less the sentence's punctuation after it) passed through [`url`].
pub fn urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(sep) = rest.find("://") {
        // The scheme: the letters, digits and `+.-` just before `://`.
        let scheme_start = rest[..sep]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-')))
            .map_or(0, |i| i + 1);
        let mut end = rest[sep..]
            .find(|c: char| {
                c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | ')' | ']')
            })
            .map_or(rest.len(), |i| sep + i);
        // Punctuation that ends a sentence is not the URL's (`...?k=v: timed out`).
        while end > sep + 3 && rest[..end].ends_with(['.', ',', ';', ':', '!', '?']) {
            end -= 1;
        }
        out.push_str(&rest[..scheme_start]);
        if scheme_start == sep {
            // `://` with no scheme: not a URL.
            out.push_str(&rest[sep..end]);
        } else {
            out.push_str(&url(&rest[scheme_start..end]));
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_and_query_values_are_masked() {
        for (given, shown) in [
            (
                "redis://:s3cret@10.0.0.5:6379/0",
                "redis://***@10.0.0.5:6379/0",
            ),
            (
                "https://user:pw@dav.example/logs/",
                "https://***@dav.example/logs/",
            ),
            (
                "redis+sentinel://h1:26379,h2:26379/m?sentinel_password=x",
                "redis+sentinel://h1:26379,h2:26379/m?sentinel_password=***",
            ),
            (
                "https://h.example/p?token=abc&flag&x=1#frag",
                "https://h.example/p?token=***&***&x=***#frag",
            ),
            (
                "http://127.0.0.1:9090/metrics",
                "http://127.0.0.1:9090/metrics",
            ),
            ("not a url", "not a url"),
            // An `@` in the path is not userinfo.
            ("http://h/a@b", "http://h/a@b"),
        ] {
            assert_eq!(url(given), shown, "{given}");
        }
    }

    #[test]
    fn urls_inside_text_are_masked() {
        assert_eq!(
            urls_in("error sending request for url (https://u:p@h/x?k=v): timed out"),
            "error sending request for url (https://***@h/x?k=***): timed out"
        );
        assert_eq!(
            urls_in("`redis://:pw@h:1/0`: bad port; and s3://bucket/key?X-Amz-Signature=abc"),
            "`redis://***@h:1/0`: bad port; and s3://bucket/key?X-Amz-Signature=***"
        );
        assert_eq!(urls_in("no url :// here"), "no url :// here");
    }
}
