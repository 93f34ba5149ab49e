//! Client authentication against pgsplit's own user list: SCRAM-SHA-256
//! (default), md5 or trust, per user.
//!
//! An unknown user goes through the same exchange as a known one, against
//! a mock secret, and fails with the same message as a wrong password, so
//! user names cannot be probed. Secrets never reach a message or a log.

use std::collections::HashMap;

use bytes::BytesMut;
use pgsplit_protocol::frontend::{self, SaslInitial};
use pgsplit_protocol::scram::{self, ScramSecret};
use pgsplit_protocol::{encode, frame, tag, ProtoError, MAX_STARTUP_PACKET_BYTES};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth_query::Secret;
use crate::config::{AuthMethod, BackendKeys, Config, User};
use crate::error::Error;

/// Secrets derived once at start-up, so a login costs no PBKDF2 run.
pub struct Secrets {
    scram: HashMap<String, ScramSecret>,
    /// Keys the mock secrets of unknown users.
    mock_key: [u8; 32],
}

impl Secrets {
    /// Derives the SCRAM secret of every configured user.
    pub fn new(cfg: &Config) -> Secrets {
        let mut scram = HashMap::new();
        for u in &cfg.users {
            if let Some(p) = &u.password {
                let secret = ScramSecret::parse_verifier(p)
                    .or_else(|| (!u.password_is_verifier()).then(|| ScramSecret::from_password(p)));
                if let Some(s) = secret {
                    scram.insert(u.name.clone(), s);
                }
            }
        }
        let mut mock_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut mock_key);
        Secrets { scram, mock_key }
    }

    /// The secrets of a reloaded configuration. The key of unknown users'
    /// mock secrets is kept, so a reload does not change what an unknown
    /// name is challenged with (a change would tell it apart from a real one).
    pub fn rebuilt(&self, cfg: &Config) -> Secrets {
        Secrets {
            mock_key: self.mock_key,
            ..Secrets::new(cfg)
        }
    }
}

/// Runs the authentication exchange for `user_name` on a client stream.
/// On success the caller sends AuthenticationOk and the rest of the
/// handshake.
///
/// # Errors
/// `AuthFailed` for a wrong password or unknown user, `Protocol` for a
/// broken exchange, `ClientGone`/`ClientIo` when the client leaves.
pub async fn authenticate<S>(
    stream: &mut S,
    buf: &mut BytesMut,
    cfg: &Config,
    secrets: &Secrets,
    user_name: &str,
    queried: Option<Option<&Secret>>,
) -> Result<Option<BackendKeys>, Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let user = cfg.user(user_name);
    let queried_secret = queried.flatten();
    let method = match (user, queried_secret) {
        (Some(u), _) => u.auth,
        (None, Some(Secret::Md5(_))) => AuthMethod::Md5,
        (None, _) => AuthMethod::ScramSha256,
    };
    let failed = || Error::AuthFailed {
        user: user_name.to_owned(),
    };
    match method {
        AuthMethod::Trust => Ok(None),
        AuthMethod::ScramSha256 => {
            let from_query = match queried_secret {
                Some(Secret::Scram(v)) => Some(v.clone()),
                _ => None,
            };
            let known = user.is_some() || from_query.is_some();
            let secret = user
                .and_then(|u| secrets.scram.get(&u.name).cloned())
                .or(from_query)
                .unwrap_or_else(|| ScramSecret::mock(user_name, &secrets.mock_key));
            let mut w = BytesMut::new();
            encode::auth_sasl(&mut w);
            send(stream, &w).await?;
            let f = read_password(stream, buf).await?;
            let init = SaslInitial::parse(f.body())?;
            if init.mechanism != "SCRAM-SHA-256" {
                return Err(ProtoError::Malformed {
                    what: "SASLInitialResponse (unsupported mechanism)",
                }
                .into());
            }
            let (exchange, server_first) =
                scram::start(&secret, init.data).map_err(|e| match e {
                    scram::ScramError::Proof => failed(),
                    _ => Error::Protocol(ProtoError::Malformed { what: "SCRAM" }),
                })?;
            w.clear();
            encode::auth_sasl_continue(&mut w, server_first.as_bytes());
            send(stream, &w).await?;
            let f = read_password(stream, buf).await?;
            let (server_final, keys) =
                exchange.finish_with_keys(f.body()).map_err(|e| match e {
                    scram::ScramError::Malformed => {
                        Error::Protocol(ProtoError::Malformed { what: "SCRAM" })
                    }
                    _ => failed(),
                })?;
            if !known {
                return Err(failed());
            }
            w.clear();
            encode::auth_sasl_final(&mut w, server_final.as_bytes());
            send(stream, &w).await?;
            Ok(user.is_none().then_some(BackendKeys::Scram(keys)))
        }
        AuthMethod::Md5 => {
            let mut salt = [0u8; 4];
            rand::thread_rng().fill_bytes(&mut salt);
            let mut w = BytesMut::new();
            encode::auth_md5(&mut w, salt);
            send(stream, &w).await?;
            let f = read_password(stream, buf).await?;
            let response = frontend::password(f.body())?;
            let stored = match (user, queried_secret) {
                (Some(u), _) => md5_stored(u),
                (None, Some(Secret::Md5(m))) => Some(m.clone()),
                _ => None,
            }
            .ok_or_else(failed)?;
            if pgsplit_protocol::md5::verify(&stored, salt, response) {
                Ok(user.is_none().then_some(BackendKeys::Md5(stored)))
            } else {
                Err(failed())
            }
        }
    }
}

fn md5_stored(u: &User) -> Option<String> {
    let p = u.password.as_deref()?;
    if u.password_is_verifier() {
        p.starts_with("md5").then(|| p.to_owned())
    } else {
        Some(pgsplit_protocol::md5::stored(&u.name, p))
    }
}

async fn send<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, b: &[u8]) -> Result<(), Error> {
    s.write_all(b).await.map_err(Error::ClientIo)?;
    // TLS holds what it encrypted until flushed; TCP's flush is free.
    s.flush().await.map_err(Error::ClientIo)
}

/// Reads the client's next message, which must be a password/SASL response.
async fn read_password<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Result<frame::Frame, Error> {
    loop {
        if let Some(f) = frame::decode(buf, MAX_STARTUP_PACKET_BYTES)? {
            if f.tag() != tag::frontend::PASSWORD {
                return Err(ProtoError::Malformed {
                    what: "authentication response",
                }
                .into());
            }
            return Ok(f);
        }
        if s.read_buf(buf).await.map_err(Error::ClientIo)? == 0 {
            return Err(Error::ClientGone);
        }
    }
}
