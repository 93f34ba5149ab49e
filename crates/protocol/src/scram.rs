//! Server side of SCRAM-SHA-256 (RFC 5802 / RFC 7677), as PostgreSQL speaks
//! it: the user name comes from the startup packet, the one in the SCRAM
//! message is ignored, and channel binding is not offered (no TLS yet).
//!
//! Secrets are kept as PostgreSQL stores them (salt, iterations, StoredKey,
//! ServerKey), so a verifier copied from `pg_authid` works as well as a
//! plaintext password, and the plaintext never needs to stay in memory.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Iterations used when a secret is derived from a plaintext password.
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// A SCRAM-SHA-256 verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramSecret(..)")
    }
}

/// Why an exchange failed. Every variant ends in FATAL `28P01` or `08P01`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    /// Wrong password (or unknown user with a mock secret).
    #[error("invalid SCRAM proof")]
    Proof,
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

impl ScramSecret {
    /// Derives a secret from a plaintext password with a fresh random salt.
    pub fn from_password(password: &str) -> ScramSecret {
        let mut salt = vec![0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::from_password_salt(password, salt, DEFAULT_ITERATIONS)
    }

    /// Derives a secret from a password, salt and iteration count.
    pub fn from_password_salt(password: &str, salt: Vec<u8>, iterations: u32) -> ScramSecret {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, b"Server Key");
        ScramSecret {
            iterations,
            salt,
            stored_key,
            server_key,
        }
    }

    /// Parses PostgreSQL's stored form
    /// `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse_verifier(s: &str) -> Option<ScramSecret> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramSecret {
            iterations: iter.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// A secret that no password matches, stable per user name and process,
    /// so an unknown user sees exactly the exchange a known one would.
    pub fn mock(user: &str, process_key: &[u8; 32]) -> ScramSecret {
        let salt = hmac(process_key, user.as_bytes())[..16].to_vec();
        ScramSecret {
            iterations: DEFAULT_ITERATIONS,
            salt,
            stored_key: hmac(process_key, b"mock stored"),
            server_key: hmac(process_key, b"mock server"),
        }
    }
}

/// An exchange after the server-first message was sent.
pub struct ScramExchange {
    secret: ScramSecret,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

/// Handles the client-first message; returns the exchange and the
/// server-first message to send in AuthenticationSASLContinue.
///
/// # Errors
/// `Malformed` for a broken message, `ChannelBinding` when the client
/// requires channel binding.
pub fn start(
    secret: &ScramSecret,
    client_first: &[u8],
) -> Result<(ScramExchange, String), ScramError> {
    let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed)?;
    let (gs2, bare) = split_gs2(msg)?;
    if gs2.starts_with("p=") {
        return Err(ScramError::ChannelBinding);
    }
    let client_nonce = bare
        .split(',')
        .find_map(|a| a.strip_prefix("r="))
        .filter(|n| !n.is_empty())
        .ok_or(ScramError::Malformed)?;
    let mut raw = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut raw);
    let nonce = format!("{client_nonce}{}", B64.encode(raw));
    let server_first = format!(
        "r={nonce},s={},i={}",
        B64.encode(&secret.salt),
        secret.iterations
    );
    Ok((
        ScramExchange {
            secret: secret.clone(),
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        },
        server_first,
    ))
}

/// Splits `gs2-header` (`n,,` / `y,,` / `p=…,,`, optional authzid) off.
fn split_gs2(msg: &str) -> Result<(&str, &str), ScramError> {
    let mut it = msg.splitn(3, ',');
    let cb = it.next().ok_or(ScramError::Malformed)?;
    let _authzid = it.next().ok_or(ScramError::Malformed)?;
    let bare = it.next().ok_or(ScramError::Malformed)?;
    if !(cb == "n" || cb == "y" || cb.starts_with("p=")) {
        return Err(ScramError::Malformed);
    }
    Ok((cb, bare))
}

impl ScramExchange {
    /// Checks the client-final message; returns the server-final message
    /// for AuthenticationSASLFinal.
    ///
    /// # Errors
    /// `Proof` when the password is wrong, `Nonce`/`Malformed` otherwise.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let msg = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed)?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(ScramError::Malformed)?;
        let nonce = without_proof
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed)?;
        if nonce != self.nonce {
            return Err(ScramError::Nonce);
        }
        let proof = B64.decode(proof).map_err(|_| ScramError::Malformed)?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.secret.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&computed, &self.secret.stored_key) {
            return Err(ScramError::Proof);
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// Compares two byte strings without an early exit on the first difference.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the client side by the RFC, independent of the server code.
    fn client_final(password: &str, client_first_bare: &str, server_first: &str) -> String {
        let mut parts = server_first.split(',');
        let nonce = parts.next().unwrap().strip_prefix("r=").unwrap();
        let salt = B64
            .decode(parts.next().unwrap().strip_prefix("s=").unwrap())
            .unwrap();
        let iters: u32 = parts
            .next()
            .unwrap()
            .strip_prefix("i=")
            .unwrap()
            .parse()
            .unwrap();
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iters, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let without = format!("c=biws,r={nonce}");
        let auth = format!("{client_first_bare},{server_first},{without}");
        let sig = hmac(&stored, auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
        format!("{without},p={}", B64.encode(proof))
    }

    #[test]
    fn accepts_right_password_rejects_wrong() {
        let secret = ScramSecret::from_password("s3cret");
        let (ex, sf) = start(&secret, b"n,,n=,r=abcdef").unwrap();
        assert!(sf.starts_with("r=abcdef"));
        let ok = ex.finish(client_final("s3cret", "n=,r=abcdef", &sf).as_bytes());
        assert!(ok.unwrap().starts_with("v="));
        let (ex, sf) = start(&secret, b"n,,n=,r=abcdef").unwrap();
        let bad = ex.finish(client_final("wrong", "n=,r=abcdef", &sf).as_bytes());
        assert_eq!(bad.unwrap_err(), ScramError::Proof);
    }

    #[test]
    fn mock_secret_rejects_everything() {
        let secret = ScramSecret::mock("nobody", &[7; 32]);
        let (ex, sf) = start(&secret, b"n,,n=,r=xyz").unwrap();
        assert_eq!(
            ex.finish(client_final("", "n=,r=xyz", &sf).as_bytes())
                .unwrap_err(),
            ScramError::Proof
        );
    }

    #[test]
    fn parses_postgres_verifier() {
        let s = ScramSecret::from_password_salt("pw", b"0123456789abcdef".to_vec(), 4096);
        let text = format!(
            "SCRAM-SHA-256$4096:{}${}:{}",
            B64.encode(&s.salt),
            B64.encode(s.stored_key),
            B64.encode(s.server_key)
        );
        assert_eq!(ScramSecret::parse_verifier(&text), Some(s));
        assert_eq!(ScramSecret::parse_verifier("md5abc"), None);
    }

    #[test]
    fn rejects_channel_binding_and_garbage() {
        let s = ScramSecret::from_password("x");
        assert_eq!(
            start(&s, b"p=tls-server-end-point,,n=,r=a").err(),
            Some(ScramError::ChannelBinding)
        );
        assert!(start(&s, b"garbage").is_err());
        assert!(start(&s, b"n,,n=").is_err());
        let (ex, _) = start(&s, b"n,,n=,r=a").unwrap();
        assert!(ex.finish(b"c=biws,r=other,p=AAAA").is_err());
    }
}
