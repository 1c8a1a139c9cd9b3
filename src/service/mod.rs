//! `ddpm-worker serve`: the gRPC API, the durable queue, one thread per device, the reaper, health,
//! reflection and Prometheus metrics, in one process. Each subsystem has its settings ([`ServeArgs`]'s
//! groups, which are `serve --help`'s headings), built in turn by [`serve`], then spawned:
//! everything is checked (models found and hashed, queue opened, destination parsed) before a port is
//! bound; the health service reports NOT_SERVING until every device has loaded and warmed its models,
//! and again from the first SIGTERM.

pub mod admin;
pub mod api;
pub mod config_file;
pub mod events;
pub mod jobs;
pub mod queue;
pub mod storage;
pub mod tls;
pub mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::api::handlers::WorkerService;
use crate::placement::device_name;
use crate::worker::WorkerContext;

/// How often the token and TLS files are checked for changes (SIGHUP checks at once).
const FILE_POLL: Duration = Duration::from_secs(5);

/// `serve`'s options, by subsystem; every flag can also come from its `DDPM_*` environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// A TOML file of these settings (keys are the long flag names); flags and DDPM_* variables win.
    #[arg(long, env = "DDPM_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub api: api::ApiArgs,
    #[command(flatten)]
    pub storage: storage::StorageArgs,
    #[command(flatten)]
    pub queue: queue::QueueArgs,
    #[command(flatten)]
    pub workers: workers::WorkerArgs,
    #[command(flatten)]
    pub jobs: jobs::JobArgs,
    #[command(flatten)]
    pub events: events::EventArgs,
    #[command(flatten)]
    pub admin: admin::AdminArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is wrong (exit code 2): nothing was started.
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Runtime(String),
}

/// Runs the service until SIGTERM or SIGINT, then drains. `on_listening` gets the bound address.
pub async fn serve(args: ServeArgs, on_listening: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    // Build: every setting checked, the models hashed and the queue opened, then the ports bound.
    let mut limits = args.jobs.build()?;
    let (dispatcher, webhook_prefixes) = args.events.build()?;
    limits.webhook_prefixes = webhook_prefixes;
    let workers = args.workers.build(workers::WorkerNeeds {
        max_batch_size: args.jobs.max_batch_size,
        scratch_dir: args.storage.scratch_dir.clone(),
        queue_name: args.queue.name(),
        retention: args.jobs.retention()?,
    })?;
    let models = args.storage.models().await?;
    let queue = args
        .queue
        .build(queue::QueueNeeds {
            lease: workers.config.lease_ttl,
            priorities: limits.priorities.clone(),
            has_devices: !workers.devices.is_empty(),
            client_name: format!("ddpm-worker {}", workers.config.worker_id),
        })
        .await?;
    let api = args.api.build().await?;
    let mut admin = args.admin.build().await?;

    // Spawn: the health port, the device threads and the reaper, then the API until drained.
    let ctx = Arc::new(WorkerContext::new(
        queue,
        args.storage.outputs(),
        models,
        workers.config.clone(),
        tokio::runtime::Handle::current(),
    ));
    if let Some(dispatcher) = dispatcher {
        tokio::spawn(dispatcher.run(Arc::clone(&ctx.queue)));
    }
    let health_only = admin.spawn();
    let (drained, running) = workers.spawn(&ctx, &admin.health, shutdown_signal())?;
    let service = WorkerService { ctx: Arc::clone(&ctx), limits, authenticated: api.authenticated() };
    on_listening(api.addr);
    tracing::info!(
        addr = %api.addr,
        models = ?ctx.models.keys().collect::<Vec<_>>(),
        devices = ?workers.devices.iter().map(|d| device_name(d.device)).collect::<Vec<_>>(),
        "listening"
    );
    api.serve(service, admin.health.service(), drained).await?;
    running.stop().await;
    if let Some(h) = health_only {
        h.abort();
    }
    if let Some(failure) = ctx.device_failure.get() {
        return Err(ServeError::Runtime(format!("drained after losing a device: {failure}")));
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// Calls `reload` every [`FILE_POLL`] and on SIGHUP, logging what came of it, for as long as the
/// process runs. A reload that fails keeps what was loaded before.
fn watch_file(what: &'static str, reload: impl Fn() -> Result<bool, String> + Send + 'static) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            {
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => drop(h.recv().await),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(FILE_POLL) => {}
                    _ = hangup => {}
                }
            }
            #[cfg(not(unix))]
            tokio::time::sleep(FILE_POLL).await;
            match reload() {
                Ok(true) => tracing::info!(what, "reloaded"),
                Ok(false) => {}
                Err(e) => tracing::error!(what, error = e, "not reloaded; the previous one stays in force"),
            }
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::nats::{NatsAuth, Secret};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(flags: &[&str]) -> Result<ServeArgs, clap::Error> {
        let base = ["serve", "--model", "m=/models/m", "--queue", "tls://nats:4222/ns"];
        Cli::try_parse_from(base.iter().chain(flags)).map(|c| c.serve)
    }

    #[test]
    fn nats_credentials_come_from_files_or_the_environment_one_kind_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "s3cret\r\n").unwrap();
        let password = password.to_str().unwrap();
        let mut args = parse(&["--nats-user", "ddpm", "--nats-password-file", password]).unwrap().queue.nats;
        args.password = None;
        let client = args.client(true).unwrap();
        let want = NatsAuth::UserPassword { user: "ddpm".into(), password: Secret::new("s3cret") };
        assert_eq!(
            (client.auth, client.require_tls),
            (want, true),
            "the file's line ending is not the password"
        );

        args.password = Some(Secret::new("other"));
        let err = args.client(false).unwrap_err();
        assert!(err.contains("--nats-password-file and DDPM_NATS_PASSWORD are both set"), "{err}");

        let mut args = parse(&["--nats-user", "ddpm"]).unwrap().queue.nats;
        args.password = None;
        let err = args.client(false).unwrap_err();
        assert!(err.contains("--nats-user needs a password"), "{err}");
        args.password = Some(Secret::new("env"));
        let want = NatsAuth::UserPassword { user: "ddpm".into(), password: Secret::new("env") };
        assert_eq!(args.client(false).unwrap().auth, want);

        let mut args = parse(&["--nats-ca", "/ca.pem"]).unwrap().queue.nats;
        (args.password, args.token) = (None, Some(Secret::new("t0ken")));
        let client = args.client(false).unwrap();
        assert_eq!(client.auth, NatsAuth::Token(Secret::new("t0ken")));
        assert!(client.require_tls, "a CA makes TLS required on a nats:// URL too");
        args.token = None;
        assert_eq!(args.client(false).unwrap().auth, NatsAuth::None);

        for (flags, conflict) in [
            (&["--nats-creds", "/c", "--nats-user", "u"][..], "--nats-user"),
            (&["--nats-creds", "/c", "--nats-token-file", "/t"], "--nats-token-file"),
            (&["--nats-password-file", "/p"], "--nats-user"),
            (&["--nats-cert", "/c"], "--nats-key"),
        ] {
            let err = parse(flags).err().unwrap_or_else(|| panic!("{flags:?} parsed")).to_string();
            assert!(err.contains(conflict), "{flags:?}: {err}");
        }
    }
}
