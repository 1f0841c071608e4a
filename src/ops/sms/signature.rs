//! Twilio's request signature (`X-Twilio-Signature`): HMAC-SHA1 keyed with the
//! account's auth token over the public URL followed by every POST parameter,
//! sorted by name, each name immediately followed by its value; base64.
//!
//! Pure, so the algorithm is checked against Twilio's own documented example.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{KeyInit as _, Mac as _};

type HmacSha1 = hmac::Hmac<sha1::Sha1>;

/// The signature Twilio sends for `params` posted to `url`.
pub fn sign(token: &str, url: &str, params: &[(String, String)]) -> String {
    STANDARD.encode(mac(token, url, params).finalize().into_bytes())
}

/// Whether `header` is the signature of `params` posted to `url`, compared in
/// constant time (a wrong guess learns nothing from the timing).
pub fn verify(token: &str, url: &str, params: &[(String, String)], header: &str) -> bool {
    let Ok(given) = STANDARD.decode(header.trim()) else {
        return false;
    };
    mac(token, url, params).verify_slice(&given).is_ok()
}

fn mac(token: &str, url: &str, params: &[(String, String)]) -> HmacSha1 {
    // Sorted by name; a repeated name by value (as Twilio's libraries do).
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac = HmacSha1::new_from_slice(token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Twilio's documentation example ("Validating signatures from Twilio"): its
    /// token, URL and parameters, and the signature it publishes.
    #[test]
    fn twilios_documented_example() {
        let token = "12345";
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let mut posted = params(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]);
        assert_eq!(sign(token, url, &posted), "RSOYDt4T1cUTdK1PDd93/VVr8B8=");
        assert!(verify(token, url, &posted, "RSOYDt4T1cUTdK1PDd93/VVr8B8="));
        // The order they arrive in does not matter; every byte of them does.
        posted.reverse();
        assert!(verify(token, url, &posted, "RSOYDt4T1cUTdK1PDd93/VVr8B8="));
        posted[0].1 = "+18005551213".to_owned();
        assert!(!verify(token, url, &posted, "RSOYDt4T1cUTdK1PDd93/VVr8B8="));
        posted[0].1 = "+18005551212".to_owned();
        assert!(!verify(
            "12346",
            url,
            &posted,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!verify(
            token,
            "https://mycompany.com/myapp.php?foo=1&bar=3",
            &posted,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        for bad in ["", "not base64!", "RSOYDt4T1cUTdK1PDd93/VVr8B8", "AAAA"] {
            assert!(!verify(token, url, &posted, bad), "{bad:?}");
        }
    }

    #[test]
    fn another_caller_gives_another_signature() {
        let posted = params(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ]);
        assert_eq!(
            sign(
                "12345",
                "https://mycompany.com/myapp.php?foo=1&bar=2",
                &posted
            ),
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        );
    }
}
