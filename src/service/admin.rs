//! What operators and orchestrators read: health (readiness and liveness, on the gRPC port and
//! optionally on a plaintext port of its own), Prometheus metrics and the log format ([`AdminArgs`]).

use std::net::SocketAddr;

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use super::ServeError;

/// The gRPC service's name in the health service (readiness, like the overall status `""`).
const WORKER_SERVICE: &str = "ddpm.v1.WorkerService";
/// The health service name of liveness.
const LIVENESS_SERVICE: &str = "liveness";

/// Health, metrics and logs.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Health, metrics and logs")]
pub struct AdminArgs {
    /// A plaintext address that serves grpc.health.v1 only, for probes that cannot speak TLS (the
    /// kubelet's gRPC probes) when the gRPC port does; none when unset.
    #[arg(long, env = "DDPM_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Prometheus metrics address (`/metrics`); none when unset.
    #[arg(long, env = "DDPM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log lines as JSON objects.
    #[arg(long, env = "DDPM_LOG_JSON")]
    pub log_json: bool,
}

/// The health port (if any) bound and the metrics exporter installed.
pub struct Admin {
    pub health: Health,
    health_listener: Option<tokio::net::TcpListener>,
}

/// Readiness and liveness as the health service reports them.
#[derive(Clone)]
pub struct Health(HealthReporter);

impl AdminArgs {
    /// Binds the health port and starts the metrics exporter. Health says NOT_SERVING (ready) and
    /// SERVING (live) until [`Health::follow`] says otherwise.
    pub async fn build(&self) -> Result<Admin, ServeError> {
        let health_listener = match self.health_listen {
            Some(h) => Some(
                tokio::net::TcpListener::bind(h)
                    .await
                    .map_err(|e| ServeError::Config(format!("--health-listen {h}: {e}")))?,
            ),
            None => None,
        };
        if let Some(m) = self.metrics_listen {
            install_metrics(m)?;
        }
        let (reporter, _) = tonic_health::server::health_reporter();
        let health = Health(reporter);
        health.not_ready().await;
        // Liveness apart from readiness: SERVING until a device is lost (a restart may bring it back),
        // whatever the queue does (a restart would not bring the queue back).
        health.0.set_service_status(LIVENESS_SERVICE, ServingStatus::Serving).await;
        Ok(Admin { health, health_listener })
    }
}

impl Admin {
    /// Serves health alone on the plaintext health port, if there is one, until the task is aborted.
    pub fn spawn(&mut self) -> Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>> {
        self.health_listener.take().map(|listener| {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let server = tonic::transport::Server::builder().add_service(self.health.service());
            tokio::spawn(server.serve_with_incoming(incoming))
        })
    }
}

impl Health {
    /// The health service, for a gRPC port.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.0.clone()))
    }

    /// Readiness and liveness follow `ready` and `live` from now on.
    pub fn follow(&self, mut ready: watch::Receiver<bool>, mut live: watch::Receiver<bool>) {
        let health = self.0.clone();
        tokio::spawn(async move {
            while live.changed().await.is_ok() {
                let live = *live.borrow_and_update();
                let status = if live { ServingStatus::Serving } else { ServingStatus::NotServing };
                health.set_service_status(LIVENESS_SERVICE, status).await;
                tracing::info!(live, "liveness changed");
            }
        });
        let health = self.0.clone();
        tokio::spawn(async move {
            while ready.changed().await.is_ok() {
                let ready = *ready.borrow_and_update();
                let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
                health.set_service_status("", status).await;
                health.set_service_status(WORKER_SERVICE, status).await;
                tracing::info!(ready, "readiness changed");
            }
        });
    }

    /// NOT_SERVING (not ready): before the devices are warm, and from the first SIGTERM.
    pub async fn not_ready(&self) {
        self.0.set_service_status(WORKER_SERVICE, ServingStatus::NotServing).await;
        self.0.set_service_status("", ServingStatus::NotServing).await;
    }
}

fn install_metrics(addr: SocketAddr) -> Result<(), ServeError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let seconds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|b| b.install())
        .map_err(|e| ServeError::Config(format!("--metrics-listen {addr}: {e}")))?;
    metrics::gauge!("ddpm_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(())
}
