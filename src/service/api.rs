//! The gRPC port: its address, tokens, TLS and reflection ([`ApiArgs`]), loaded and bound by
//! [`ApiArgs::build`], and served with the job API, health and reflection by [`Api::serve`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tonic::service::interceptor::InterceptedService;

use super::{ServeError, tls, watch_file};
use crate::api::auth::{self, Auth};
use crate::api::handlers::WorkerService;
use crate::api::{FILE_DESCRIPTOR_SET, pb};
use crate::console::Console;

/// Who may call server reflection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReflectionAccess {
    /// The same tokens as the API (any role).
    Auth,
    /// Anyone who reaches the port.
    Public,
}

/// The gRPC port.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "gRPC API")]
pub struct ApiArgs {
    /// gRPC address (port 0: any free port; the bound address is printed).
    #[arg(long, env = "DDPM_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Bearer tokens, one per line: `TOKEN [ROLE [NAME]]`, ROLE read, submit (default) or admin. Every
    /// RPC but health then needs one. Read again when it changes and on SIGHUP. Without it, anyone who
    /// reaches the port may do anything.
    #[arg(long, env = "DDPM_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Who may use server reflection: `auth` (the API's tokens) or `public`.
    #[arg(long, env = "DDPM_REFLECTION", value_enum, default_value = "auth")]
    pub reflection: ReflectionAccess,
    /// TLS certificate chain (PEM) of the gRPC port; read again when it changes and on SIGHUP.
    #[arg(long, env = "DDPM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "DDPM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM): clients must then present a certificate one of them signed (mTLS).
    #[arg(long, env = "DDPM_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Largest accepted request message, in bytes.
    #[arg(long, env = "DDPM_MAX_REQUEST_BYTES", default_value_t = 64 * 1024)]
    pub max_request_bytes: usize,
    /// Serve the web console at /console/ on this port (same tokens, roles and TLS as the API; the
    /// port then also speaks HTTP/1.1).
    #[arg(long, env = "DDPM_CONSOLE")]
    pub console: bool,
}

/// The gRPC port, bound, with its tokens and certificates loaded.
pub struct Api {
    listener: tokio::net::TcpListener,
    pub addr: SocketAddr,
    auth: Option<Arc<Auth>>,
    tls: Option<Arc<tls::Tls>>,
    reflection: ReflectionAccess,
    max_request_bytes: usize,
    console: bool,
}

impl ApiArgs {
    /// Loads the tokens and certificates (their files are watched for changes once serving), then binds
    /// the port.
    pub async fn build(&self) -> Result<Api, ServeError> {
        let config = ServeError::Config;
        let auth = match &self.auth_token_file {
            Some(path) => {
                let auth = Auth::load(path).map_err(|e| config(format!("--auth-token-file {e}")))?;
                if auth.is_empty() {
                    tracing::warn!(path = %path.display(), "the token file has no tokens: every call is refused");
                }
                Some(Arc::new(auth))
            }
            None => {
                if !self.listen.ip().is_loopback() {
                    tracing::warn!(listen = %self.listen, "no --auth-token-file: anyone who reaches the port may submit and cancel jobs");
                }
                None
            }
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let files = tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                    http1: self.console,
                };
                Some(Arc::new(
                    tls::Tls::load(files).map_err(|e| config(format!("--tls-cert/--tls-key: {e}")))?,
                ))
            }
            _ => None,
        };
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|e| ServeError::Config(format!("--listen {}: {e}", self.listen)))?;
        let addr = listener.local_addr().map_err(|e| ServeError::Runtime(e.to_string()))?;
        Ok(Api {
            listener,
            addr,
            auth,
            tls,
            reflection: self.reflection,
            max_request_bytes: self.max_request_bytes,
            console: self.console,
        })
    }
}

impl Api {
    /// Whether calls need a token.
    pub fn authenticated(&self) -> bool {
        self.auth.is_some()
    }

    /// Serves health (open: probes carry no token), the API and reflection (behind the tokens when
    /// there are any, reflection unless it is public) until `shutdown`; tokens and certificates reload
    /// as their files change.
    pub async fn serve(
        self,
        service: WorkerService,
        health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        // Both reflection versions describe the API, health and the google.rpc error details (so that
        // reflection clients such as grpcurl can decode BadRequest).
        let described = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = described().build_v1().map_err(|e| ServeError::Runtime(e.to_string()))?;
        let reflection_v1alpha =
            described().build_v1alpha().map_err(|e| ServeError::Runtime(e.to_string()))?;
        let console = self
            .console
            .then(|| Console::new(service.clone(), self.auth.clone(), self.tls.is_some()).router());
        let worker = pb::worker_service_server::WorkerServiceServer::new(service)
            .max_decoding_message_size(self.max_request_bytes);
        let mut routes = tonic::service::Routes::builder();
        routes.add_service(health);
        match &self.auth {
            Some(a) => {
                let intercept = || auth::interceptor(Arc::clone(a));
                routes.add_service(InterceptedService::new(worker, intercept()));
                if self.reflection == ReflectionAccess::Public {
                    routes.add_service(reflection_v1).add_service(reflection_v1alpha);
                } else {
                    routes
                        .add_service(InterceptedService::new(reflection_v1, intercept()))
                        .add_service(InterceptedService::new(reflection_v1alpha, intercept()));
                }
            }
            None => {
                routes.add_service(worker).add_service(reflection_v1).add_service(reflection_v1alpha);
            }
        };
        let mut routes = routes.routes();
        if let Some(console) = console {
            // The console's paths (/console/...) are apart from every gRPC path (/package.Service/...).
            routes = tonic::service::Routes::from(routes.into_axum_router().merge(console));
        }
        let router = tonic::transport::Server::builder().accept_http1(self.console).add_routes(routes);
        if let Some(a) = &self.auth {
            let a = Arc::clone(a);
            watch_file("token file", move || a.reload());
        }
        let served = match self.tls {
            Some(t) => {
                let reloaded = Arc::clone(&t);
                watch_file("TLS certificate", move || reloaded.reload());
                router.serve_with_incoming_shutdown(t.incoming(self.listener), shutdown).await
            }
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(self.listener);
                router.serve_with_incoming_shutdown(incoming, shutdown).await
            }
        };
        served.map_err(|e| ServeError::Runtime(e.to_string()))
    }
}
