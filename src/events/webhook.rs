//! Webhook requests as the Standard Webhooks specification makes them (standardwebhooks.com): a POST of
//! the CloudEvent with `webhook-id` (the event's id), `webhook-timestamp` (Unix seconds) and
//! `webhook-signature: v1,<base64 of HMAC-SHA256("{id}.{timestamp}.{body}")>` under the server's
//! secret, so that a receiver checks who sent it, that it was not changed, and how old it is, with any
//! Standard Webhooks library.

use std::time::Duration;

use aws_smithy_types::base64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::JobEvent;

/// The shortest secret taken (the specification asks for 24 to 64 random bytes).
const MIN_SECRET_BYTES: usize = 24;

/// Signs webhook requests with the server's secret.
#[derive(Clone)]
pub struct Signer {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(…)")
    }
}

impl Signer {
    /// A secret as Standard Webhooks writes it: base64 of 24 to 64 random bytes, after an optional
    /// `whsec_` (as every Standard Webhooks library reads it).
    pub fn new(secret: &str) -> Result<Self, String> {
        let secret = secret.trim();
        let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
        let key =
            base64::decode(encoded).map_err(|e| format!("not base64 (after an optional whsec_): {e}"))?;
        if key.len() < MIN_SECRET_BYTES {
            return Err(format!("a webhook secret needs at least {MIN_SECRET_BYTES} bytes (base64 of them)"));
        }
        let mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
        Ok(Self { mac })
    }

    /// The `webhook-signature` header of a request.
    pub fn signature(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        format!("v1,{}", base64::encode(mac.finalize().into_bytes()))
    }
}

/// Sends events to webhooks.
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    signer: Signer,
}

impl Sender {
    /// A sender whose requests time out after `timeout`; redirects are not followed (a webhook's
    /// address is the one configured, nowhere else).
    pub fn new(signer: Signer, timeout: Duration) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ddpm-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { client, signer })
    }

    /// POSTs `event` to `url`; any 2xx answer delivers it.
    pub async fn post(&self, url: &str, event: &JobEvent) -> Result<(), String> {
        let timestamp = crate::queue::now_ms() / 1000;
        let signature = self.signer.signature(&event.id, timestamp, event.body.as_bytes());
        let response = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/cloudevents+json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(event.body.clone())
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = response.status();
        if status.is_success() { Ok(()) } else { Err(format!("{url}: HTTP {status}")) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_standard_webhooks_example() {
        // The specification's own example (standard-webhooks/spec.md, "Verifying webhook signatures").
        let signer = Signer::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signer.signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(Signer::new("whsec_c2hvcnQ=").is_err(), "5 bytes");
        assert!(Signer::new("whsec_not base64!").is_err());
        assert!(Signer::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok(), "the prefix is optional");
    }
}
