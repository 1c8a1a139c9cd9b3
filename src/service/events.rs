//! Where job events go ([`EventArgs`]): the server's webhooks, the prefixes a job's own webhook may
//! start with, and the secret that signs them ([`crate::events`]).

use std::path::PathBuf;
use std::time::Duration;

use super::ServeError;
use crate::events::dispatch::Dispatcher;
use crate::events::webhook::{Sender, Signer};

/// Job events.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Job events")]
pub struct EventArgs {
    /// A webhook that gets every job event: a CloudEvent (JSON) POSTed with a Standard Webhooks
    /// signature, retried with backoff until it answers 2xx. Repeatable.
    #[arg(long = "webhook", env = "DDPM_WEBHOOKS", value_delimiter = ',', value_name = "URL")]
    pub webhooks: Vec<String>,
    /// A URL prefix a job's own webhook (spec.webhook_url) may start with, such as
    /// https://hooks.example.com/ddpm/. Repeatable; none: jobs may not name webhooks.
    #[arg(long = "allow-webhook", env = "DDPM_ALLOW_WEBHOOKS", value_delimiter = ',', value_name = "PREFIX")]
    pub allow_webhooks: Vec<String>,
    /// A file holding the webhooks' signing secret (Standard Webhooks: base64 of 24 to 64 random bytes,
    /// optionally after whsec_). Needed with --webhook or --allow-webhook.
    #[arg(long, env = "DDPM_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Time limit of one webhook request.
    #[arg(long, env = "DDPM_WEBHOOK_TIMEOUT_SECONDS", default_value_t = 10.0)]
    pub webhook_timeout_seconds: f64,
}

impl EventArgs {
    /// The webhook dispatch, when there are webhooks (`None` otherwise), and the checked prefixes of
    /// jobs' own webhooks.
    pub fn build(&self) -> Result<(Option<Dispatcher>, Vec<String>), ServeError> {
        let config = ServeError::Config;
        for url in &self.webhooks {
            crate::api::convert::webhook_url(url).map_err(|e| config(format!("--webhook {url}: {e}")))?;
        }
        let mut prefixes = Vec::new();
        for prefix in &self.allow_webhooks {
            let url = crate::api::convert::webhook_url(prefix)
                .map_err(|e| config(format!("--allow-webhook {prefix}: {e}")))?;
            prefixes.push(url.to_string());
        }
        if self.webhooks.is_empty() && prefixes.is_empty() {
            return Ok((None, prefixes));
        }
        let Some(path) = &self.webhook_secret_file else {
            return Err(config("--webhook and --allow-webhook need --webhook-secret-file".into()));
        };
        let secret = std::fs::read_to_string(path)
            .map_err(|e| config(format!("--webhook-secret-file {}: {e}", path.display())))?;
        let signer = Signer::new(&secret)
            .map_err(|e| config(format!("--webhook-secret-file {}: {e}", path.display())))?;
        if !(self.webhook_timeout_seconds > 0.0 && self.webhook_timeout_seconds <= 300.0) {
            return Err(config("--webhook-timeout-seconds must be in (0, 300]".into()));
        }
        let sender = Sender::new(signer, Duration::from_secs_f64(self.webhook_timeout_seconds))
            .map_err(|e| config(format!("the webhook client: {e}")))?;
        Ok((Some(Dispatcher { webhooks: self.webhooks.clone(), sender }), prefixes))
    }
}
