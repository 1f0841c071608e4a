//! The signed sticky cookie.
//!
//! The cookie's id picks the user's bucket, and the bucket hash is documented, so an
//! id a client made up would let it choose its version (and, repeated, weigh on the
//! canary's verdict for the whole fleet). The proxy therefore signs the ids it issues:
//! the cookie is `<id>.<tag>`, the tag being the first 16 bytes of
//! HMAC-SHA256(key, id) in unpadded base64url. A cookie without a valid tag is a new
//! user: a fresh id, a fresh bucket, a new cookie. The bucket is still the documented
//! hash of the id alone, so tools that compute buckets keep working.
//!
//! The key comes from the environment variable `routing.sticky_secret_env` names,
//! the same on every proxy of a fleet so each accepts the others' cookies. Without
//! one, each process makes a random key and says so: cookies then hold only until
//! a restart, and only on the proxy that issued them.

use std::io::Read as _;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit as _, Mac as _};

use crate::config::MIN_STICKY_SECRET_BYTES;
use crate::routing;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Bytes of the MAC kept in the cookie: 128 bits.
const TAG_BYTES: usize = 16;
/// Their unpadded base64url length.
const TAG_CHARS: usize = 22;
/// A signed cookie value for an id the proxy made: 32 hex, a dot, the tag.
pub const SIGNED_LEN: usize = 32 + 1 + TAG_CHARS;

/// Signs and checks sticky ids with one key.
#[derive(Clone)]
pub struct StickySigner {
    /// Keyed once: each use clones the state and hashes only the id.
    mac: HmacSha256,
    /// The key was made by this process (no `sticky_secret_env`).
    pub per_process: bool,
}

impl std::fmt::Debug for StickySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("StickySigner")
            .field("per_process", &self.per_process)
            .finish_non_exhaustive()
    }
}

impl StickySigner {
    pub fn new(key: &[u8]) -> Self {
        Self {
            mac: HmacSha256::new_from_slice(key)
                .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length")),
            per_process: false,
        }
    }

    /// The random key of this process (from the kernel's CSPRNG, made once: a
    /// reload keeps it, so users keep their cookies).
    pub fn per_process() -> Self {
        static KEY: OnceLock<[u8; 32]> = OnceLock::new();
        let key = KEY.get_or_init(|| {
            let mut key = [0u8; 32];
            let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key));
            if read.is_err() {
                // No /dev/urandom: fall back to the process's seeded generator rather
                // than refuse to serve; still unknown to clients.
                key.iter_mut().for_each(|b| *b = fastrand::u8(..));
            }
            key
        });
        Self {
            per_process: true,
            ..Self::new(key)
        }
    }

    /// The signer for `secret_env`: the variable's value, or a per-process key when
    /// no variable is named or it is unset (`run` refuses to start on the latter, see
    /// [`crate::config::sticky_secret_problem`]).
    pub fn from_env(secret_env: Option<&str>) -> Self {
        match secret_env.and_then(|name| std::env::var(name).ok()) {
            Some(secret) if secret.len() >= MIN_STICKY_SECRET_BYTES => Self::new(secret.as_bytes()),
            _ => Self::per_process(),
        }
    }

    /// The cookie value for an id the proxy made.
    pub fn sign(&self, id: &[u8; 32]) -> [u8; SIGNED_LEN] {
        let mut out = [0u8; SIGNED_LEN];
        out[..32].copy_from_slice(id);
        out[32] = b'.';
        let tag = self.tag(id);
        let written = URL_SAFE_NO_PAD
            .encode_slice(tag, &mut out[33..])
            .unwrap_or(0);
        debug_assert_eq!(written, TAG_CHARS);
        out
    }

    /// The cookie value for any valid sticky id (`routing::valid_sticky_id`): for
    /// tools and tests that pick their ids.
    pub fn signed(&self, id: &str) -> String {
        format!("{id}.{}", URL_SAFE_NO_PAD.encode(self.tag(id.as_bytes())))
    }

    /// The id of a cookie value, when its tag is this key's: `None` for an unsigned,
    /// forged or malformed value.
    pub fn verify<'a>(&self, value: &'a [u8]) -> Option<&'a [u8]> {
        let dot = value.iter().rposition(|&b| b == b'.')?;
        let (id, tag) = (&value[..dot], &value[dot + 1..]);
        if !routing::valid_sticky_id(id) || tag.len() != TAG_CHARS {
            return None;
        }
        let mut decoded = [0u8; TAG_BYTES + 2];
        let n = URL_SAFE_NO_PAD.decode_slice(tag, &mut decoded).ok()?;
        if n != TAG_BYTES {
            return None;
        }
        self.mac
            .clone()
            .chain_update(id)
            .verify_truncated_left(&decoded[..TAG_BYTES])
            .ok()
            .map(|()| id)
    }

    fn tag(&self, id: &[u8]) -> [u8; TAG_BYTES] {
        let full = self.mac.clone().chain_update(id).finalize().into_bytes();
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(&full[..TAG_BYTES]);
        tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_signed_id_verifies_and_anything_else_does_not() {
        let signer = StickySigner::new(b"a secret of the fleet, 32 bytes!");
        let value = signer.sign(ID);
        assert_eq!(&value[..33], b"0123456789abcdef0123456789abcdef.");
        assert_eq!(signer.verify(&value), Some(&ID[..]));
        // Unsigned, as the proxy issued before signing.
        assert_eq!(signer.verify(ID), None);
        // Another id with this tag; this id with another key's tag.
        let mut other = value;
        other[0] = b'f';
        assert_eq!(signer.verify(&other), None);
        let foreign = StickySigner::new(b"somebody else's key, not ours!!!").sign(ID);
        assert_eq!(signer.verify(&foreign), None);
        // A one-character change of the tag, a short tag, junk.
        let mut flipped = value;
        flipped[SIGNED_LEN - 1] ^= 1;
        assert_eq!(signer.verify(&flipped), None);
        assert_eq!(signer.verify(&value[..SIGNED_LEN - 1]), None);
        assert_eq!(signer.verify(b"..."), None);
        assert_eq!(signer.verify(b""), None);
    }

    #[test]
    fn the_per_process_key_is_one_per_process_and_no_one_elses() {
        let a = StickySigner::per_process();
        let b = StickySigner::per_process();
        assert!(a.per_process);
        assert_eq!(b.verify(&a.sign(ID)), Some(&ID[..]));
        let other = StickySigner::new(b"a secret of the fleet, 32 bytes!");
        assert_eq!(other.verify(&a.sign(ID)), None);
        // Chosen ids sign the same way as made ones.
        let chosen = a.signed("user-7");
        assert_eq!(a.verify(chosen.as_bytes()), Some(&b"user-7"[..]));
        assert_eq!(
            a.signed(std::str::from_utf8(ID).unwrap()).as_bytes(),
            &a.sign(ID)[..]
        );
    }
}
