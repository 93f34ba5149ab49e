//! TLS to the servers: `sslmode` and `sslrootcert` in `[primary]` /
//! `[replica]` (or the URLs' parameters), with libpq's meanings.
//!
//! - `disable` (the default): plaintext. The primary is reached through an
//!   SSH tunnel that already encrypts; `prefer` would cost an SSLRequest
//!   round trip through it on every connect and encrypt twice.
//! - `prefer`: TLS when the server offers it, not verified.
//! - `require`: TLS or no connection; as in libpq, when a root certificate
//!   file is given the chain is verified (it acts as `verify-ca`).
//! - `verify-ca`: the chain must lead to `sslrootcert`.
//! - `verify-full`: also the host name (or IP address) must match.
//!
//! A unix-socket host ignores it, as libpq does. A certificate that fails
//! verification ends the connect with the reason (`08001` to the client).
//! The rustls configuration is built once per mode and root file and kept
//! until a reload, which reads the files again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::SslMode;

/// The SSLRequest message.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

type Key = (SslMode, Option<PathBuf>);

fn cache() -> &'static Mutex<HashMap<Key, Arc<rustls::ClientConfig>>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, Arc<rustls::ClientConfig>>>> = OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// Forgets the built configurations: the next connect reads the root
/// certificate files again (a reload calls it).
pub fn forget() {
    cache().lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// Asks the server for TLS and runs the handshake, or says why not.
/// `Ok(None)`: plaintext (`prefer` and the server said `N`).
///
/// # Errors
/// One line: the server refused TLS under `require`/`verify-*`, the
/// root file cannot be read, or the certificate failed verification.
pub(crate) async fn start(
    mut tcp: TcpStream,
    host: &str,
    mode: SslMode,
    rootcert: Option<&Path>,
) -> Result<Result<Box<tokio_rustls::client::TlsStream<TcpStream>>, TcpStream>, String> {
    let config = client_config(mode, rootcert)?;
    tcp.write_all(&SSL_REQUEST)
        .await
        .map_err(|e| format!("SSLRequest: {e}"))?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| format!("SSLRequest: {e}"))?;
    match answer[0] {
        b'S' => {}
        b'N' if mode == SslMode::Prefer => return Ok(Err(tcp)),
        b'N' => {
            return Err(format!(
                "the server does not support TLS (sslmode {mode:?})"
            ))
        }
        other => {
            return Err(format!(
                "unexpected answer to SSLRequest: {:?}",
                char::from(other)
            ))
        }
    }
    // verify-full checks this name; the other modes need one to send.
    let name = ServerName::try_from(host.to_owned())
        .or_else(|_| ServerName::try_from("localhost".to_owned()))
        .map_err(|e| format!("server name {host:?}: {e}"))?;
    let s = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    Ok(Ok(Box::new(s)))
}

fn client_config(
    mode: SslMode,
    rootcert: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let key = (mode, rootcert.map(Path::to_path_buf));
    if let Some(c) = cache().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    // ring, as for clients (see `tls`): deprecated by rustls for lacking
    // post-quantum key exchange, chosen for building with cc only.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, rootcert) {
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(format!(
                "sslmode {mode:?} needs sslrootcert (the CA to verify the server with)"
            ))
        }
        (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => {
            Arc::new(Unverified(provider))
        }
        (SslMode::VerifyFull, Some(path)) => webpki(path, provider)?,
        // `require` with a root file acts as verify-ca, as in libpq.
        (SslMode::VerifyCa | SslMode::Require, Some(path)) => {
            Arc::new(ChainOnly(webpki(path, provider)?))
        }
    };
    let config = Arc::new(
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    );
    cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, config.clone());
    Ok(config)
}

fn webpki(
    path: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect)
        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "sslrootcert {}: no certificate in it",
            path.display()
        ));
    }
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))
}

/// `verify-ca`: the chain is verified, the name is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root file: encrypted, not
/// authenticated (libpq's behaviour); the handshake's signatures are still
/// checked.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
