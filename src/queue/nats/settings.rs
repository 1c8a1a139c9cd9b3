//! `serve`'s NATS settings: the flags and environment that say how to reach the queue's servers
//! (credentials, TLS, replicas), turned into connection options, and start-up errors that name the
//! setting to look at.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::connect::{ConnectError, NatsAuth, NatsClientOptions, NatsFile, Secret, TlsFault};
use super::{NatsOptions, NatsQueue, OpenError};
use crate::queue::QueueError;

/// How long `serve` keeps trying to open a queue whose servers answer but time out (a cluster busy with
/// a whole fleet's start-up, or electing a leader).
const OPEN_PATIENCE: Duration = Duration::from_secs(90);

/// The NATS flags of `serve` (each with its `DDPM_*` variable; secrets only from files or the
/// environment, never as flags).
#[derive(Debug, Clone, clap::Args)]
pub struct NatsSettings {
    /// Stream and KV replicas of a NATS queue (3 in a NATS cluster).
    #[arg(
        id = "nats_replicas",
        value_name = "N",
        long = "nats-replicas",
        env = "DDPM_NATS_REPLICAS",
        default_value_t = 1
    )]
    pub replicas: usize,
    /// NATS credentials file (.creds: user JWT and nkey seed, from `nsc` or the account's operator).
    #[arg(
        id = "nats_creds",
        value_name = "FILE",
        long = "nats-creds",
        env = "DDPM_NATS_CREDS",
        conflicts_with_all = ["nats_user", "nats_token_file"]
    )]
    pub creds: Option<PathBuf>,
    /// NATS user name; the password comes from --nats-password-file or DDPM_NATS_PASSWORD.
    #[arg(
        id = "nats_user",
        value_name = "NAME",
        long = "nats-user",
        env = "DDPM_NATS_USER",
        conflicts_with = "nats_token_file"
    )]
    pub user: Option<String>,
    /// A file holding the NATS password (a trailing newline is ignored).
    #[arg(
        id = "nats_password_file",
        value_name = "FILE",
        long = "nats-password-file",
        env = "DDPM_NATS_PASSWORD_FILE",
        requires = "nats_user"
    )]
    pub password_file: Option<PathBuf>,
    /// A file holding the NATS token (a trailing newline is ignored); or DDPM_NATS_TOKEN.
    #[arg(
        id = "nats_token_file",
        value_name = "FILE",
        long = "nats-token-file",
        env = "DDPM_NATS_TOKEN_FILE"
    )]
    pub token_file: Option<PathBuf>,
    /// CA certificates (PEM) that signed the NATS server's certificate (default: the system's). Makes
    /// TLS required, as do a tls:// URL and --nats-cert.
    #[arg(id = "nats_ca", value_name = "FILE", long = "nats-ca", env = "DDPM_NATS_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for a NATS server that verifies clients (mTLS).
    #[arg(
        id = "nats_cert",
        value_name = "FILE",
        long = "nats-cert",
        env = "DDPM_NATS_CERT",
        requires = "nats_key"
    )]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        id = "nats_key",
        value_name = "FILE",
        long = "nats-key",
        env = "DDPM_NATS_KEY",
        requires = "nats_cert"
    )]
    pub key: Option<PathBuf>,
    /// DDPM_NATS_PASSWORD: the password in the environment (never a flag, which any local user could
    /// read from the process list).
    #[arg(skip = secret_env("DDPM_NATS_PASSWORD"))]
    pub password: Option<Secret>,
    /// DDPM_NATS_TOKEN: the token in the environment.
    #[arg(skip = secret_env("DDPM_NATS_TOKEN"))]
    pub token: Option<Secret>,
}

/// A secret from environment variable `name`, if set and not empty.
fn secret_env(name: &str) -> Option<Secret> {
    std::env::var(name).ok().filter(|v| !v.is_empty()).map(Secret::new)
}

/// A secret read from `path` (`flag`'s file), without its trailing newline.
fn read_secret(flag: &str, path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let value = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    if value.is_empty() {
        return Err(format!("{flag} {}: the file is empty", path.display()));
    }
    Ok(Secret::new(value))
}

/// The servers and namespace of a `nats://` or `tls://` queue URL, and whether it requires TLS; `None`
/// for any other URL. Several servers (the members of a cluster, so that the first connection and every
/// reconnection can go to any of them) are separated by commas: `nats://a:4222,b:4222,c:4222/NAMESPACE`
/// (a later server may repeat the scheme). The servers come back with their scheme, comma-separated, as
/// [`super::connect::connect`] takes them; an entry that is not `HOST[:PORT]` is left for
/// [`check_servers`] to name.
pub fn parse_url(queue: &str) -> Option<(String, &str, bool)> {
    let tls = queue.starts_with("tls://");
    let scheme = if tls { "tls://" } else { "nats://" };
    let rest = queue.strip_prefix(scheme)?;
    let (servers, namespace) = match rest.rsplit_once(',') {
        Some((first, last)) => {
            let last = last.strip_prefix(scheme).unwrap_or(last);
            let (server, namespace) = last.split_once('/').unwrap_or((last, "ddpm"));
            (format!("{first},{server}"), namespace)
        }
        None => {
            let (server, namespace) = rest.split_once('/').unwrap_or((rest, "ddpm"));
            (server.to_string(), namespace)
        }
    };
    let servers = servers
        .split(',')
        .map(|server| format!("{scheme}{}", server.strip_prefix(scheme).unwrap_or(server)))
        .collect::<Vec<_>>()
        .join(",");
    Some((servers, namespace, tls))
}

/// Checks the servers [`parse_url`] found in `queue`: each `HOST[:PORT]`, none empty.
fn check_servers(queue: &str, servers: &str) -> Result<(), String> {
    for server in servers.split(',') {
        let address = server.split_once("://").map_or(server, |(_, address)| address);
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) if !address.ends_with(']') => (host, Some(port)),
            _ => (address, None),
        };
        let bad_port = port.is_some_and(|p| p.parse::<u16>().is_err());
        if host.is_empty() || host.contains(['/', '@', ' ', ',']) || bad_port {
            return Err(format!(
                "--queue {queue}: {server:?} is not a NATS server; expected nats://HOST[:PORT][,HOST[:PORT]…][/NAMESPACE] \
                 (or tls://…), every server of the cluster with the same scheme"
            ));
        }
    }
    Ok(())
}

impl NatsSettings {
    /// The first NATS connection setting that was given, if any (for a queue that is not NATS).
    pub fn given(&self) -> Option<&'static str> {
        [
            (self.creds.is_some(), "--nats-creds"),
            (self.user.is_some(), "--nats-user"),
            (self.password_file.is_some(), "--nats-password-file"),
            (self.token_file.is_some(), "--nats-token-file"),
            (self.ca.is_some(), "--nats-ca"),
            (self.cert.is_some(), "--nats-cert"),
            (self.password.is_some(), "DDPM_NATS_PASSWORD"),
            (self.token.is_some(), "DDPM_NATS_TOKEN"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }

    /// Connects to the queue at `queue` (`nats://` or `tls://HOST:PORT[/NAMESPACE]`) as `client_name`
    /// (shown by the servers' monitoring); the error names the setting to look at.
    pub async fn open(
        &self,
        queue: &str,
        options: NatsOptions,
        client_name: &str,
    ) -> Result<NatsQueue, String> {
        let Some((url, namespace, tls)) = parse_url(queue) else {
            return Err(format!("--queue {queue:?}: not a nats:// or tls:// URL"));
        };
        if url.contains('@') {
            return Err(format!(
                "--queue {queue}: credentials in the URL would show in the process list and logs; use \
                 --nats-creds, --nats-user with --nats-password-file, or --nats-token-file"
            ));
        }
        check_servers(queue, &url)?;
        let client = NatsClientOptions { name: Some(client_name.to_string()), ..self.client(tls)? };
        let options = NatsOptions { replicas: self.replicas, ..options };
        let connection = super::connect::connect(&url, &client, super::REQUEST_TIMEOUT)
            .await
            .map_err(|e| self.describe(queue, &client, e.into()))?;
        // Opening creates the stream, buckets and consumers when they are missing. A fleet that starts
        // at once asks the cluster's meta leader for them all together, and on a loaded cluster some of
        // those requests time out: an outage of a few seconds, waited out here rather than failing
        // the pod's start.
        let deadline = Instant::now() + OPEN_PATIENCE;
        let mut pause = Duration::from_millis(500);
        loop {
            match NatsQueue::open(connection.clone(), namespace, options.clone()).await {
                Ok(queue) => return Ok(queue),
                // Only timeouts: a server without JetStream ("no responders") is a setting to fix.
                Err(QueueError::Unavailable(e))
                    if e.contains("timed out") && Instant::now() + pause < deadline =>
                {
                    let pause_now = pause / 2 + pause.mul_f64(fastrand::f64() / 2.0);
                    tracing::warn!(error = %e, pause_seconds = pause_now.as_secs_f64(), "opening the queue");
                    tokio::time::sleep(pause_now).await;
                    pause = (pause * 2).min(Duration::from_secs(8));
                }
                Err(e) => return Err(self.describe(queue, &client, e.into())),
            }
        }
    }

    /// The connection's TLS settings and credentials.
    pub fn client(&self, tls_url: bool) -> Result<NatsClientOptions, String> {
        let password = match (&self.password_file, &self.password) {
            (Some(_), Some(_)) => {
                return Err("--nats-password-file and DDPM_NATS_PASSWORD are both set: keep one".into());
            }
            (Some(path), None) => Some(read_secret("--nats-password-file", path)?),
            (None, env) => env.clone(),
        };
        let token = match (&self.token_file, &self.token) {
            (Some(_), Some(_)) => {
                return Err("--nats-token-file and DDPM_NATS_TOKEN are both set: keep one".into());
            }
            (Some(path), None) => Some(read_secret("--nats-token-file", path)?),
            (None, env) => env.clone(),
        };
        let auth = match (&self.creds, &self.user, password, token) {
            (None, None, None, None) => NatsAuth::None,
            (Some(creds), None, None, None) => NatsAuth::Creds(creds.clone()),
            (None, Some(user), Some(password), None) => {
                NatsAuth::UserPassword { user: user.clone(), password }
            }
            (None, Some(_), None, None) => {
                return Err(
                    "--nats-user needs a password: --nats-password-file FILE or DDPM_NATS_PASSWORD".into()
                );
            }
            (None, None, Some(_), None) => {
                return Err("a NATS password (DDPM_NATS_PASSWORD) needs --nats-user".into());
            }
            (None, None, None, Some(token)) => NatsAuth::Token(token),
            _ => {
                return Err(
                    "NATS credentials: give one of --nats-creds, --nats-user with a password, or a token"
                        .into(),
                );
            }
        };
        Ok(NatsClientOptions {
            require_tls: tls_url || self.ca.is_some() || self.cert.is_some(),
            ca: self.ca.clone(),
            client_cert: self.cert.clone().zip(self.key.clone()),
            auth,
            name: None,
        })
    }

    /// A start-up error of the NATS queue, naming the setting to look at.
    fn describe(&self, queue: &str, client: &NatsClientOptions, e: OpenError) -> String {
        let e = match e {
            OpenError::Queue(e) => return format!("--queue {queue}: {e}"),
            OpenError::Connect(e) => e,
        };
        match &e {
            ConnectError::File { file, .. } => {
                let flag = match file {
                    NatsFile::Ca => "--nats-ca",
                    NatsFile::ClientCert => "--nats-cert",
                    NatsFile::ClientKey => "--nats-key",
                    NatsFile::Creds => "--nats-creds",
                };
                format!("{flag} {e}")
            }
            ConnectError::Refused { auth, .. } => {
                let check = match auth {
                    NatsAuth::None => {
                        "the server wants credentials: --nats-creds, --nats-user with a password, or a token"
                    }
                    NatsAuth::Creds(_) => "check --nats-creds",
                    NatsAuth::UserPassword { .. } => {
                        "check --nats-user and the password (--nats-password-file or DDPM_NATS_PASSWORD)"
                    }
                    NatsAuth::Token(_) => "check the token (--nats-token-file or DDPM_NATS_TOKEN)",
                };
                format!("--queue {queue}: {e} ({check})")
            }
            ConnectError::Tls { fault, .. } => format!("--queue {queue}: {e} ({})", tls_hint(*fault, client)),
            ConnectError::Unreachable(_) => format!("--queue {queue}: {e}"),
        }
    }
}

/// What to check when the TLS handshake failed.
fn tls_hint(fault: TlsFault, client: &NatsClientOptions) -> String {
    match (fault, &client.ca) {
        (TlsFault::UntrustedServer, Some(ca)) => {
            format!("the server's certificate is not signed by a CA in --nats-ca {}", ca.display())
        }
        (TlsFault::UntrustedServer, None) => {
            "the server's certificate is not signed by a CA the system trusts: give its CA with --nats-ca"
                .into()
        }
        (TlsFault::ServerName, _) => "the server's certificate does not name the host in --queue".into(),
        (TlsFault::ClientRejected, _) if client.client_cert.is_some() => {
            "the server did not accept the client certificate (--nats-cert, --nats-key)".into()
        }
        (TlsFault::ClientRejected, _) => {
            "the server wants a client certificate: --nats-cert and --nats-key".into()
        }
        (TlsFault::Other, _) => "does the server have TLS enabled?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::{check_servers, parse_url};

    #[test]
    fn a_queue_url_names_one_server_or_a_cluster_and_a_namespace() {
        let parsed = |q| parse_url(q).map(|(servers, ns, tls)| (servers, ns.to_string(), tls));
        let ok = |servers: &str, ns: &str, tls| Some((servers.to_string(), ns.to_string(), tls));
        assert_eq!(parsed("nats://nats:4222/team-a"), ok("nats://nats:4222", "team-a", false));
        assert_eq!(parsed("tls://nats:4222"), ok("tls://nats:4222", "ddpm", true));
        assert_eq!(
            parsed("nats://a:4222,b:4222,c:4222/team-a"),
            ok("nats://a:4222,nats://b:4222,nats://c:4222", "team-a", false)
        );
        assert_eq!(parsed("tls://a,tls://b:4333"), ok("tls://a,tls://b:4333", "ddpm", true));
        assert_eq!(parsed("sqlite:q.sqlite"), None);
        for bad in
            ["nats://a:4222,,b:4222/ns", "nats://a:4222,tls://b:4222/ns", "nats:///ns", "nats://a/b,c/ns"]
        {
            let (servers, _, _) = parse_url(bad).unwrap();
            let err = check_servers(bad, &servers).unwrap_err();
            assert!(err.contains("is not a NATS server"), "{bad}: {err}");
        }
        check_servers("", "nats://a:4222,nats://b,nats://[::1]:4222,nats://[::1]").unwrap();
    }
}
