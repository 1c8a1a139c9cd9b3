//! TLS, and mTLS with a client CA, on the gRPC port (rustls with ring).
//!
//! tonic's own TLS takes its certificate once; here every connection is accepted with the
//! configuration current at that moment, and the files are read again when they change (polled, and
//! on SIGHUP), so a renewed certificate (cert-manager rewriting a Secret) is served without a restart.
//! A renewal that does not parse leaves the previous configuration in place.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates, PEM: when set, clients must present a certificate signed by one of them.
    pub client_ca: Option<PathBuf>,
    /// Whether the port also speaks HTTP/1.1 (the web console's browsers and tools): offered after h2.
    pub http1: bool,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.cert, &self.key].into_iter().chain(self.client_ca.as_ref())
    }

    /// The configuration of these files, and a digest of their bytes (to tell a change).
    fn build(&self) -> Result<(ServerConfig, [u8; 32]), String> {
        let mut digest = Sha256::new();
        for path in self.paths() {
            digest.update(std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?);
        }
        let read_err = |path: &PathBuf, e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| read_err(&self.cert, &e))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", self.cert.display()));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| read_err(&self.key, &e))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca).map_err(|e| read_err(ca, &e))? {
                    roots.add(cert.map_err(|e| read_err(ca, &e))?).map_err(|e| read_err(ca, &e))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| read_err(ca, &e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("{} and {}: {e}", self.cert.display(), self.key.display()))?;
        // gRPC is HTTP/2 only; the console's clients may ask for HTTP/1.1 (browsers take h2 too).
        config.alpn_protocols = vec![b"h2".to_vec()];
        if self.http1 {
            config.alpn_protocols.push(b"http/1.1".to_vec());
        }
        Ok((config, digest.finalize().into()))
    }
}

/// The server's TLS configuration, kept current with its files.
pub struct Tls {
    files: TlsFiles,
    config: ArcSwap<ServerConfig>,
    digest: std::sync::Mutex<[u8; 32]>,
}

impl Tls {
    /// Reads the files; any error stops the server from starting.
    pub fn load(files: TlsFiles) -> Result<Tls, String> {
        let (config, digest) = files.build()?;
        Ok(Tls { files, config: ArcSwap::from_pointee(config), digest: std::sync::Mutex::new(digest) })
    }

    /// Reads the files again; `Ok(true)` when they changed. On error the configuration stays.
    pub fn reload(&self) -> Result<bool, String> {
        let (config, digest) = self.files.build()?;
        let mut last = self.digest.lock().unwrap_or_else(|p| p.into_inner());
        if *last == digest {
            return Ok(false);
        }
        self.config.store(Arc::new(config));
        *last = digest;
        Ok(true)
    }

    /// TLS connections accepted on `listener`, each handshaken on its own task so that a slow or
    /// silent client holds up no one else. Ends when the receiving side (the server) goes away.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = tx.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = TlsAcceptor::from(self.config.load_full());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}
