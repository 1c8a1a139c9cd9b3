//! Connecting to the NATS server: TLS (a CA bundle for the server's certificate, a client certificate
//! for mTLS), credentials (a `.creds` file, user and password, or a token), and errors that say which
//! of them failed. The first connection is tried once: a refusal or a bad certificate is a setting to
//! fix, not an outage to wait out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_nats::rustls::pki_types::pem::PemObject;
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use async_nats::rustls::{self, AlertDescription, CertificateError, ClientConfig, RootCertStore};

/// A secret string (password, token) that is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// How the client proves who it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    #[default]
    None,
    /// A `.creds` file: the user JWT and its nkey seed (decentralised auth, `nsc`).
    Creds(PathBuf),
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
}

impl NatsAuth {
    /// What was offered, in words, for error messages.
    pub fn describe(&self) -> &'static str {
        match self {
            NatsAuth::None => "connection without credentials",
            NatsAuth::Creds(_) => "credentials file",
            NatsAuth::UserPassword { .. } => "user and password",
            NatsAuth::Token(_) => "token",
        }
    }
}

/// TLS and credentials of the connection. The default is what a plain `nats://` URL gets: TLS only
/// when the server asks for it, verified against the system's CA certificates, and no credentials.
#[derive(Debug, Clone, Default)]
pub struct NatsClientOptions {
    /// Refuse a connection without TLS (a `tls://` URL does too).
    pub require_tls: bool,
    /// CA certificates (PEM) that signed the server's certificate, instead of the system's.
    pub ca: Option<PathBuf>,
    /// Certificate chain and private key (PEM) presented to a server that verifies clients (mTLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub auth: NatsAuth,
    /// The connection's name, as the server's monitoring shows it (`/connz`): which worker it is.
    pub name: Option<String>,
}

/// A file of the connection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsFile {
    Ca,
    ClientCert,
    ClientKey,
    Creds,
}

/// What went wrong in a TLS handshake with the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFault {
    /// The server's certificate is not signed by a trusted CA (or expired, or malformed).
    UntrustedServer,
    /// The server's certificate does not name the host that was dialled.
    ServerName,
    /// The server turned the client's certificate (or its absence) down.
    ClientRejected,
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A file of the settings cannot be used.
    #[error("{}: {reason}", path.display())]
    File { file: NatsFile, path: PathBuf, reason: String },
    /// The server turned the credentials down.
    #[error("the NATS server refused the {}: {detail}", auth.describe())]
    Refused { auth: NatsAuth, detail: String },
    #[error("TLS with the NATS server failed: {detail}")]
    Tls { fault: TlsFault, detail: String },
    #[error("cannot connect to the NATS server: {0}")]
    Unreachable(String),
}

/// Connects to `url` (`nats://` or `tls://`; several servers of a cluster separated by commas, each
/// with its scheme) with `client`. The first connection tries each server once; later reconnections go to
/// any of them, and to the servers the cluster announces.
pub async fn connect(
    url: &str,
    client: &NatsClientOptions,
    request_timeout: std::time::Duration,
) -> Result<async_nats::Client, ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .request_timeout(Some(request_timeout))
        // Our own rustls configuration (ring, like the rest of the binary): the library's default
        // builder needs a process-wide crypto provider, which a binary with two providers lacks.
        .tls_client_config(tls_config(client)?)
        .require_tls(client.require_tls);
    if let Some(name) = &client.name {
        options = options.name(name);
    }
    options =
        match &client.auth {
            NatsAuth::None => options,
            NatsAuth::Creds(path) => options.credentials_file(path).await.map_err(|e| {
                ConnectError::File { file: NatsFile::Creds, path: path.clone(), reason: e.to_string() }
            })?,
            NatsAuth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.expose().to_string())
            }
            NatsAuth::Token(token) => options.token(token.expose().to_string()),
        };
    let servers: Vec<&str> = url.split(',').collect();
    options.connect(servers).await.map_err(|e| classify(e, &client.auth))
}

fn file_err(file: NatsFile, path: &Path, reason: impl std::fmt::Display) -> ConnectError {
    ConnectError::File { file, path: path.to_path_buf(), reason: reason.to_string() }
}

/// The certificates in the PEM file `path`, at least one.
fn load_certs(file: NatsFile, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConnectError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_err(file, path, e))?;
    if certs.is_empty() {
        return Err(file_err(file, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The rustls client configuration of `client`: its CA bundle (or the system's certificates) and
/// client certificate. The files are read here, so that a bad one is named before any connection.
pub fn tls_config(client: &NatsClientOptions) -> Result<ClientConfig, ConnectError> {
    let mut roots = RootCertStore::empty();
    match &client.ca {
        Some(ca) => {
            for cert in load_certs(NatsFile::Ca, ca)? {
                roots.add(cert).map_err(|e| file_err(NatsFile::Ca, ca, e))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::warn!(error = %e, "loading the system's CA certificates");
            }
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::Tls { fault: TlsFault::Other, detail: e.to_string() })?
        .with_root_certificates(roots);
    match &client.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = load_certs(NatsFile::ClientCert, cert)?;
            let key_der =
                PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(NatsFile::ClientKey, key, e))?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                file_err(NatsFile::ClientKey, key, format!("does not go with {}: {e}", cert.display()))
            })
        }
    }
}

/// Sorts a failed first connection into what the operator has to fix.
fn classify(e: async_nats::ConnectError, auth: &NatsAuth) -> ConnectError {
    use async_nats::ConnectErrorKind as Kind;
    let detail = e.to_string();
    if let Some(tls) = rustls_cause(&e) {
        return ConnectError::Tls { fault: tls_fault(tls), detail };
    }
    match e.kind() {
        Kind::AuthorizationViolation | Kind::Authentication => {
            // The server's own words when it sent some ("nats: authorization violation").
            let detail = std::error::Error::source(&e).map_or(detail, |s| s.to_string());
            ConnectError::Refused { auth: auth.clone(), detail }
        }
        Kind::Tls => ConnectError::Tls { fault: TlsFault::Other, detail },
        _ => ConnectError::Unreachable(detail),
    }
}

/// The rustls error behind `e`, if a TLS handshake failed (it arrives wrapped in an `io::Error`).
fn rustls_cause(e: &async_nats::ConnectError) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps; look inside it.
        if let Some(tls) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = err.source();
    }
    None
}

fn tls_fault(e: &rustls::Error) -> TlsFault {
    match e {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => TlsFault::ServerName,
        rustls::Error::InvalidCertificate(_) => TlsFault::UntrustedServer,
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::AccessDenied,
        ) => TlsFault::ClientRejected,
        _ => TlsFault::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_not_printed() {
        let auth = NatsAuth::UserPassword { user: "u".into(), password: Secret::new("hunter2") };
        assert!(!format!("{auth:?}").contains("hunter2"));
        assert!(!format!("{:?}", NatsAuth::Token(Secret::new("t0ken"))).contains("t0ken"));
    }

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let check = |client: NatsClientOptions, file: NatsFile, path: &Path, reason: &str| match tls_config(
            &client,
        ) {
            Err(ConnectError::File { file: f, path: p, reason: r }) => {
                assert_eq!((f, p.as_path()), (file, path));
                assert!(r.contains(reason), "{r}");
            }
            other => panic!("expected a file error, got {:?}", other.map(|_| ())),
        };
        let ca = |path: &Path| NatsClientOptions { ca: Some(path.to_path_buf()), ..Default::default() };
        check(ca(&empty), NatsFile::Ca, &empty, "no PEM certificate");
        check(ca(&missing), NatsFile::Ca, &missing, "");
        let cert =
            NatsClientOptions { client_cert: Some((empty.clone(), missing.clone())), ..Default::default() };
        check(cert, NatsFile::ClientCert, &empty, "no PEM certificate");
    }
}
