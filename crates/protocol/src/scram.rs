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
        self.finish_with_keys(client_final)
            .map(|(server_final, _)| server_final)
    }

    /// As [`ScramExchange::finish`], also giving the client's keys: the
    /// ClientKey its proof reveals and the verifier's ServerKey. With them
    /// the proxy can log in to a server holding the same verifier without
    /// the password (SCRAM passthrough, as PgBouncer does for `auth_query`).
    ///
    /// # Errors
    /// As [`ScramExchange::finish`].
    pub fn finish_with_keys(self, client_final: &[u8]) -> Result<(String, ClientKeys), ScramError> {
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
        Ok((
            format!("v={}", B64.encode(server_signature)),
            ClientKeys {
                client_key,
                server_key: self.secret.server_key,
            },
        ))
    }
}

/// What a SCRAM login needs besides the password: the ClientKey (which a
/// client's proof reveals to a server that knows the StoredKey) and the
/// ServerKey (to check the server's signature).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ClientKeys {
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ClientKeys {
    /// Never prints a key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKeys(..)")
    }
}

/// Compares two byte strings without an early exit on the first difference.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The client side of SCRAM-SHA-256, for the proxy's own logins to its
/// servers. PBKDF2 is the whole cost of a login (4096 rounds of HMAC by
/// default), and a server answers every login of one user with the same
/// salt and iteration count: [`SaltedKeys`] keeps what was derived, so a
/// pool that opens many connections pays it once per server and user.
pub struct ScramClient {
    /// Empty when logging in with `keys` instead.
    password: Vec<u8>,
    keys: Option<ClientKeys>,
    nonce: String,
    /// After the server-first message: the AuthMessage and the keys.
    state: Option<([u8; 32], String)>,
}

/// Derived SCRAM keys, by password, salt and iteration count.
#[derive(Default)]
pub struct SaltedKeys {
    map: std::sync::Mutex<std::collections::HashMap<SaltedKey, [u8; 32]>>,
}

/// SHA-256 of the password, salt and iteration count.
type SaltedKey = ([u8; 32], Vec<u8>, u32);

/// Entries a [`SaltedKeys`] holds before it starts over.
const SALTED_KEYS: usize = 256;

impl SaltedKeys {
    /// `Hi(password, salt, iterations)`, from the cache when it is there.
    pub fn salted(&self, password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
        // Keyed by a hash of the password: the cache holds no plaintext.
        let key = (Sha256::digest(password).into(), salt.to_vec(), iterations);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = map.get(&key) {
            return *k;
        }
        drop(map);
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut salted);
        map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= SALTED_KEYS {
            map.clear();
        }
        map.insert(key, salted);
        salted
    }
}

impl ScramClient {
    pub fn new(password: &[u8]) -> ScramClient {
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        ScramClient {
            password: password.to_vec(),
            keys: None,
            nonce: B64.encode(raw),
            state: None,
        }
    }

    /// A client that logs in with a user's keys rather than its password
    /// (see [`ScramExchange::finish_with_keys`]): the server must hold the
    /// verifier the keys came from.
    pub fn with_keys(keys: ClientKeys) -> ScramClient {
        ScramClient {
            keys: Some(keys),
            ..ScramClient::new(b"")
        }
    }

    /// The client-first message (no channel binding; the user name is the
    /// startup packet's).
    pub fn client_first(&self) -> String {
        format!("n,,n=,r={}", self.nonce)
    }

    /// Takes the server-first message; returns the client-final one.
    ///
    /// # Errors
    /// `Malformed` for a broken message, `Nonce` when the server's nonce
    /// does not extend the client's.
    pub fn server_first(&mut self, msg: &[u8], keys: &SaltedKeys) -> Result<String, ScramError> {
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed)?;
        let attr = |k: &str| {
            msg.split(',')
                .find_map(|a| a.strip_prefix(k))
                .ok_or(ScramError::Malformed)
        };
        let nonce = attr("r=")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt = B64.decode(attr("s=")?).map_err(|_| ScramError::Malformed)?;
        let iterations: u32 = attr("i=")?.parse().map_err(|_| ScramError::Malformed)?;
        if iterations == 0 {
            return Err(ScramError::Malformed);
        }
        let (client_key, server_key) = match self.keys {
            Some(k) => (k.client_key, k.server_key),
            None => {
                let salted = keys.salted(&self.password, &salt, iterations);
                (hmac(&salted, b"Client Key"), hmac(&salted, b"Server Key"))
            }
        };
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("n=,r={},{msg},{without_proof}", self.nonce);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for i in 0..32 {
            proof[i] = client_key[i] ^ signature[i];
        }
        self.state = Some((server_key, auth_message));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final message: the server knew the password too.
    ///
    /// # Errors
    /// `Proof` when its signature is wrong, `Malformed` otherwise.
    pub fn server_final(&self, msg: &[u8]) -> Result<(), ScramError> {
        let (server_key, auth_message) = self.state.as_ref().ok_or(ScramError::Malformed)?;
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed)?;
        let v = msg.strip_prefix("v=").ok_or(ScramError::Malformed)?;
        let got = B64.decode(v).map_err(|_| ScramError::Malformed)?;
        let want = hmac(server_key, auth_message.as_bytes());
        if constant_time_eq(&got, &want) {
            Ok(())
        } else {
            Err(ScramError::Proof)
        }
    }
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
    fn keys_from_one_login_log_in_again_without_the_password() {
        let secret = ScramSecret::from_password("s3cret");
        let salted = SaltedKeys::default();
        // A client logs in to the proxy with its password...
        let mut c = ScramClient::new(b"s3cret");
        let (ex, sf) = start(&secret, c.client_first().as_bytes()).unwrap();
        let fin = c.server_first(sf.as_bytes(), &salted).unwrap();
        let (server_final, keys) = ex.finish_with_keys(fin.as_bytes()).unwrap();
        c.server_final(server_final.as_bytes()).unwrap();
        // ...and the proxy logs in to a server with the same verifier.
        let mut p = ScramClient::with_keys(keys);
        let (ex, sf) = start(&secret, p.client_first().as_bytes()).unwrap();
        let fin = p.server_first(sf.as_bytes(), &salted).unwrap();
        let server_final = ex.finish(fin.as_bytes()).unwrap();
        p.server_final(server_final.as_bytes()).unwrap();
        // Another verifier (a changed password) refuses them.
        let other = ScramSecret::from_password("new");
        let mut p = ScramClient::with_keys(keys);
        let (ex, sf) = start(&other, p.client_first().as_bytes()).unwrap();
        let fin = p.server_first(sf.as_bytes(), &salted).unwrap();
        assert_eq!(ex.finish(fin.as_bytes()).unwrap_err(), ScramError::Proof);
        assert_eq!(format!("{keys:?}"), "ClientKeys(..)");
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

    #[test]
    fn the_client_logs_in_to_the_server_side_and_derives_once() {
        let secret = ScramSecret::from_password("s3cret");
        let keys = SaltedKeys::default();
        for _ in 0..3 {
            let mut c = ScramClient::new(b"s3cret");
            let (ex, server_first) = start(&secret, c.client_first().as_bytes()).unwrap();
            let fin = c.server_first(server_first.as_bytes(), &keys).unwrap();
            let server_final = ex.finish(fin.as_bytes()).unwrap();
            c.server_final(server_final.as_bytes()).unwrap();
        }
        assert_eq!(
            keys.map.lock().unwrap().len(),
            1,
            "one derivation for three logins"
        );
        // A wrong password is refused by the server, and a server that does
        // not know the password is refused by the client.
        let mut c = ScramClient::new(b"wrong");
        let (ex, server_first) = start(&secret, c.client_first().as_bytes()).unwrap();
        let fin = c.server_first(server_first.as_bytes(), &keys).unwrap();
        assert_eq!(ex.finish(fin.as_bytes()), Err(ScramError::Proof));
        let mut c = ScramClient::new(b"s3cret");
        let (_, server_first) = start(&secret, c.client_first().as_bytes()).unwrap();
        c.server_first(server_first.as_bytes(), &keys).unwrap();
        assert_eq!(
            c.server_final(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(ScramError::Proof)
        );
        // A nonce the server did not extend from the client's.
        let mut c = ScramClient::new(b"s3cret");
        assert_eq!(
            c.server_first(b"r=other,s=AAAA,i=4096", &keys),
            Err(ScramError::Nonce)
        );
        assert_eq!(
            c.server_first(b"garbage", &keys),
            Err(ScramError::Malformed)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::proptest_cases(1000)))]

        /// Arbitrary client-first and client-final messages are answered
        /// with an error, never a panic and never a login.
        #[test]
        fn arbitrary_client_messages_never_panic_or_log_in(
            first in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            last in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let secret = ScramSecret::from_password_salt("pw", b"0123456789abcdef".to_vec(), 16);
            let _ = start(&secret, &first);
            let (ex, _) = start(&secret, b"n,,n=,r=abc").unwrap();
            proptest::prop_assert!(ex.finish(&last).is_err());
            let mut c = ScramClient::new(b"pw");
            let _ = c.server_first(&first, &SaltedKeys::default());
            let _ = c.server_final(&last);
        }

        /// A right client-final message with any one byte changed does not
        /// log in: every byte of it is bound by the proof.
        #[test]
        fn a_changed_byte_in_a_right_proof_never_logs_in(
            at in proptest::prelude::any::<proptest::sample::Index>(),
            to in proptest::prelude::any::<u8>(),
        ) {
            let secret = ScramSecret::from_password_salt("pw", b"0123456789abcdef".to_vec(), 16);
            let (ex, sf) = start(&secret, b"n,,n=,r=abc").unwrap();
            let mut fin = client_final("pw", "n=,r=abc", &sf).into_bytes();
            let i = at.index(fin.len());
            proptest::prop_assume!(fin[i] != to);
            fin[i] = to;
            proptest::prop_assert!(ex.finish(&fin).is_err(), "{:?}", String::from_utf8_lossy(&fin));
        }
    }
}
