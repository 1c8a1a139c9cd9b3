//! Key-value helpers of the NATS queue: reads, compare-and-swap updates (retried on a conflict) and
//! scans of a bucket's latest values.

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::records::{decode, encode};
use super::{MAX_CAS_TRIES, NatsQueue, REQUEST_TIMEOUT, nats_err};
use crate::queue::QueueError;

/// What a CAS update closure decides.
pub(super) enum Edit<T, R> {
    /// Write this value, then return `R`.
    Write(T, R),
    /// Write nothing and return `R`.
    Keep(R),
}

/// Whether a write was refused because the key's revision was not the one expected: a compare-and-swap
/// conflict. A clustered stream answers it with error code 10164 (the constant form of "wrong last
/// sequence"), which async-nats 0.51 reports as `UpdateErrorKind::Other`, not `WrongLastRevision`.
fn is_conflict(e: &(dyn std::error::Error + 'static)) -> bool {
    use jetstream::ErrorCode;
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(js) = err.downcast_ref::<jetstream::Error>()
            && matches!(
                js.error_code(),
                ErrorCode::STREAM_WRONG_LAST_SEQUENCE | ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
            )
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Whether a compare-and-swap update lost to another write of the key (in either form the server
/// answers it).
pub(super) fn lost_race(e: &kv::UpdateError) -> bool {
    e.kind() == kv::UpdateErrorKind::WrongLastRevision || is_conflict(e)
}

/// Whether a create-only write found the key there. Besides `AlreadyExists`, a create that lost the race
/// on a clustered bucket can come back as the conflict itself, when async-nats's own check of the key
/// (a direct get) reached a replica that had not seen the winner's write.
pub(super) fn already_exists(e: &kv::CreateError) -> bool {
    e.kind() == kv::CreateErrorKind::AlreadyExists || is_conflict(e)
}

impl NatsQueue {
    /// The latest value of `key` and its revision, read from the bucket's stream leader.
    ///
    /// Not `Store::entry`: on a bucket with direct gets (the default) any replica answers it, and a
    /// follower that has not applied the latest write yet answers with an older value, or with none for
    /// a key just created. A compare-and-swap would only retry on that, but decisions are made on these
    /// reads too: a shard record read as missing would drop its task, a job read as missing would fail
    /// its shards. The leader has every acknowledged write.
    pub(super) async fn read<T: for<'de> Deserialize<'de>>(
        &self,
        store: &kv::Store,
        key: &str,
    ) -> Result<Option<(T, u64)>, QueueError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let subject = format!("{}{key}", store.prefix);
        let message = match store.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(nats_err(&format!("reading {key}"), e)),
        };
        let operation = message.headers.get("KV-Operation").map(|v| v.as_str());
        if matches!(operation, Some("DEL" | "PURGE")) {
            return Ok(None);
        }
        Ok(Some((decode(&format!("{} {key}", store.name), &message.payload)?, message.sequence)))
    }

    /// Read-modify-write of one key with compare-and-swap on its revision, retried on a conflict.
    pub(super) async fn update<T, R>(
        &self,
        store: &kv::Store,
        key: &str,
        mut edit: impl FnMut(Option<T>) -> Result<Edit<T, R>, QueueError>,
    ) -> Result<R, QueueError>
    where
        T: Serialize + for<'de> Deserialize<'de>,
    {
        for _ in 0..MAX_CAS_TRIES {
            let current = self.read::<T>(store, key).await?;
            let revision = current.as_ref().map(|(_, r)| *r);
            match edit(current.map(|(v, _)| v))? {
                Edit::Keep(r) => return Ok(r),
                Edit::Write(value, r) => {
                    let body = encode(&value)?;
                    let written = match revision {
                        Some(rev) => store
                            .update(key, body, rev)
                            .await
                            .map(|_| ())
                            .map_err(|e| (lost_race(&e), e.to_string())),
                        None => store
                            .create(key, body)
                            .await
                            .map(|_| ())
                            .map_err(|e| (already_exists(&e), e.to_string())),
                    };
                    match written {
                        Ok(()) => return Ok(r),
                        Err((true, _)) => continue,
                        Err((false, e)) => return Err(nats_err(&format!("writing {key}"), e)),
                    }
                }
            }
        }
        Err(QueueError::Unavailable(format!("{key}: too much contention ({MAX_CAS_TRIES} tries)")))
    }

    /// The latest value of every key in `store`.
    pub(super) async fn scan<T: for<'de> Deserialize<'de>>(
        &self,
        store: &kv::Store,
    ) -> Result<Vec<T>, QueueError> {
        // Fresh stream info (`Store::status` is cached): an empty bucket would leave the watch silent.
        let info = store.stream.get_info().await.map_err(|e| nats_err(&format!("{} info", store.name), e))?;
        if info.state.messages == 0 {
            return Ok(Vec::new());
        }
        // An ordered consumer delivering the last message per key; `delta` counts what is left.
        let mut watch = store
            .watch_with_history(">")
            .await
            .map_err(|e| nats_err(&format!("scanning {}", store.name), e))?;
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout(REQUEST_TIMEOUT, watch.next())
                .await
                .map_err(|_| QueueError::Unavailable(format!("scanning {}: timed out", store.name)))?;
            let Some(entry) = next else { break };
            let entry = entry.map_err(|e| nats_err(&format!("scanning {}", store.name), e))?;
            if entry.operation == kv::Operation::Put {
                out.push(decode(&format!("{} {}", store.name, entry.key), &entry.value)?);
            }
            if entry.delta == 0 {
                break;
            }
        }
        Ok(out)
    }
}

pub(super) async fn open_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, QueueError> {
    let name = config.bucket.clone();
    match js.get_key_value(&name).await {
        Ok(store) => Ok(store),
        Err(_) => {
            js.create_key_value(config).await.map_err(|e| nats_err(&format!("creating bucket {name}"), e))
        }
    }
}
