//! The job queue `serve` opens ([`QueueArgs`]): SQLite in this process, or a NATS JetStream queue that
//! any number of workers share.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::ServeError;
use crate::queue::nats::settings as nats_settings;
use crate::queue::nats::{NatsOptions, NatsSettings};
use crate::queue::sqlite::SqliteStore;
use crate::queue::{Queue, SqliteQueue};

/// The queue.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Queue")]
pub struct QueueArgs {
    /// The job queue: sqlite:PATH (embedded; one process), or nats://HOST:PORT[/NAMESPACE] (NATS
    /// JetStream, shared by any number of workers); tls://HOST:PORT[/NAMESPACE] requires TLS. For a NATS
    /// cluster, name every server, comma-separated (nats://a:4222,b:4222,c:4222/NAMESPACE): the first
    /// connection then succeeds while any of them is up, and reconnections try them all (as well as the
    /// servers the cluster announces).
    #[arg(long, env = "DDPM_QUEUE", default_value = "sqlite:ddpm-data/queue.sqlite")]
    pub queue: String,
    /// How to reach a NATS queue's servers: credentials, TLS, replicas.
    #[command(flatten)]
    pub nats: NatsSettings,
}

/// What the queue needs to know of the rest of the service.
pub struct QueueNeeds {
    /// A shard's lease: NATS redelivers a message not acknowledged for this long.
    pub lease: Duration,
    /// Every priority a job may have (NATS keeps a consumer for each).
    pub priorities: std::ops::RangeInclusive<i32>,
    /// Whether this process runs shards (a SQLite queue is only this process's).
    pub has_devices: bool,
    /// This worker's name, for the NATS servers' view of their connections.
    pub client_name: String,
}

impl QueueArgs {
    /// `sqlite:PATH` (one process) or `nats://` / `tls://HOST:PORT[/NAMESPACE]` (any number of workers
    /// sharing it), opened.
    pub async fn build(&self, needs: QueueNeeds) -> Result<Arc<dyn Queue>, ServeError> {
        let config = ServeError::Config;
        if let Some(path) = self.queue.strip_prefix("sqlite:") {
            if let Some(flag) = self.nats.given() {
                return Err(config(format!("{flag} is for a NATS queue, but --queue is {}", self.queue)));
            }
            if !needs.has_devices {
                return Err(config(
                    "--devices none needs a NATS queue: the workers that run the shards share it".into(),
                ));
            }
            let path = PathBuf::from(path);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| config(format!("--queue: {}: {e}", dir.display())))?;
            }
            let store =
                SqliteStore::open(&path).map_err(|e| config(format!("--queue {}: {e}", path.display())))?;
            return Ok(Arc::new(SqliteQueue::new(store)));
        }
        if nats_settings::parse_url(&self.queue).is_some() {
            let options = NatsOptions {
                // Heartbeats come every quarter lease, well inside the server's redelivery timer.
                ack_wait: needs.lease,
                // Every consumer a job can land on exists from the start, so that an autoscaler
                // watching their pending counts sees work while no worker is running.
                priorities: Some(needs.priorities),
                ..NatsOptions::default()
            };
            return Ok(Arc::new(
                self.nats.open(&self.queue, options, &needs.client_name).await.map_err(config)?,
            ));
        }
        Err(config(format!(
            "--queue {:?}: expected sqlite:PATH, nats://HOST:PORT[,HOST:PORT…][/NAMESPACE] or tls://…",
            self.queue
        )))
    }

    /// The queue's name in metrics: the namespace of a NATS queue (after the servers), else `sqlite`.
    pub fn name(&self) -> String {
        queue_name(&self.queue)
    }
}

fn queue_name(queue: &str) -> String {
    nats_settings::parse_url(queue).map_or_else(|| "sqlite".into(), |(_, namespace, _)| namespace.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_queue_is_named_by_its_nats_namespace() {
        assert_eq!(super::queue_name("nats://nats:4222/team-a"), "team-a");
        assert_eq!(super::queue_name("tls://nats:4222"), "ddpm");
        assert_eq!(super::queue_name("sqlite:/var/lib/q.sqlite"), "sqlite");
    }
}
