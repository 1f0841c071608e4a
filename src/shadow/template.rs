//! Route templates: `/users/123` and `/users/456` are one route, `/users/{n}`, so
//! differences and noise are learned per route and not per URL. Ids are told by
//! their shape alone (digits, UUIDs, long hex), never by a list of routes the
//! operator would have to keep up to date.

/// Longest template kept; a longer path is cut (and marked) so a hostile client
/// cannot make one template large.
const MAX_TEMPLATE_BYTES: usize = 200;

/// The template of a request: the method and the path with its ids replaced; the
/// query is never part of it (queries carry tokens and personal data).
pub fn template(method: &http::Method, path: &str) -> String {
    let mut out = String::with_capacity(path.len().min(MAX_TEMPLATE_BYTES) + 8);
    out.push_str(method.as_str());
    out.push(' ');
    if path.is_empty() {
        out.push('/');
        return out;
    }
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment_template(segment));
        if out.len() > MAX_TEMPLATE_BYTES {
            let mut cut = MAX_TEMPLATE_BYTES;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push('…');
            break;
        }
    }
    out
}

/// A segment, or the placeholder of the id it looks like.
fn segment_template(segment: &str) -> &str {
    let bytes = segment.as_bytes();
    if bytes.is_empty() {
        return segment;
    }
    if bytes.iter().all(u8::is_ascii_digit) {
        return "{n}";
    }
    if is_uuid(bytes) {
        return "{uuid}";
    }
    // Long hex with a digit in it: an object id or a hash. The digit keeps words
    // made of a-f (`deadbeefcafe` is rare; `facade` is not long enough anyway).
    if bytes.len() >= 8
        && bytes.iter().all(u8::is_ascii_hexdigit)
        && bytes.iter().any(u8::is_ascii_digit)
    {
        return "{hex}";
    }
    segment
}

/// `8-4-4-4-12` hex digits.
fn is_uuid(bytes: &[u8]) -> bool {
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn ids_become_placeholders_and_words_stay() {
        for (path, want) in [
            ("/", "GET /"),
            ("", "GET /"),
            ("/users/123", "GET /users/{n}"),
            ("/users/456/orders/7", "GET /users/{n}/orders/{n}"),
            (
                "/items/3f2b8c1e-9a4d-4b5e-8f6a-1c2d3e4f5a6b",
                "GET /items/{uuid}",
            ),
            (
                "/blobs/5d41402abc4b2a76b9719d911017c592",
                "GET /blobs/{hex}",
            ),
            ("/commits/deadbeef", "GET /commits/deadbeef"),
            ("/commits/deadbee1", "GET /commits/{hex}"),
            ("/users/me", "GET /users/me"),
            ("/v2/users/", "GET /v2/users/"),
            ("/a1b2c3", "GET /a1b2c3"),
        ] {
            assert_eq!(template(&Method::GET, path), want, "{path}");
        }
        assert_eq!(template(&Method::HEAD, "/users/1"), "HEAD /users/{n}");
    }

    #[test]
    fn a_long_path_is_cut() {
        let path = format!("/{}", "é".repeat(400));
        let t = template(&Method::GET, &path);
        assert!(
            t.len() <= MAX_TEMPLATE_BYTES + '…'.len_utf8(),
            "{}",
            t.len()
        );
        assert!(t.ends_with('…'));
    }
}
