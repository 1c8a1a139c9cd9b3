//! Bearer-token authentication and roles.
//!
//! `serve --auth-token-file FILE` holds one token per line: `TOKEN [ROLE [NAME]]`, `#` comments.
//! ROLE is `read`, `submit` (the default) or `admin`; NAME is who the token stands for in logs and as a
//! job's owner (default: `token-` and the first 8 hex digits of the token's SHA-256). The file is read
//! again when it changes (polled, so a Kubernetes Secret's atomic swap is seen) and on SIGHUP; a file
//! that no longer parses leaves the tokens as they were, and says why in the log.
//!
//! Tokens are compared as SHA-256 digests, every one of them, in constant time ([`subtle`]), so the
//! time a check takes says nothing of how close a guess was. No token is ever logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

use super::error::ServiceError;

/// What a caller may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// GetJob, ListJobs, WatchJob.
    Read,
    /// Also SubmitJob, and CancelJob and RetryJob of the caller's own jobs.
    Submit,
    /// Also CancelJob and RetryJob of anyone's jobs.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Submit => "submit",
            Role::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        [Role::Read, Role::Submit, Role::Admin].into_iter().find(|r| r.as_str() == s)
    }
}

/// Who is calling, as the authentication layer put it on the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// The owner of jobs submitted to a server without tokens.
pub const ANONYMOUS: &str = "anonymous";

impl Caller {
    /// The caller of a server without tokens: anyone may do anything.
    pub fn anonymous() -> Caller {
        Caller { name: ANONYMOUS.into(), role: Role::Admin }
    }

    pub fn require(&self, role: Role) -> Result<(), ServiceError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ServiceError::PermissionDenied(format!(
                "{} has the {} role; this needs {}",
                self.name,
                self.role.as_str(),
                role.as_str()
            )))
        }
    }

    /// Cancelling or retrying a job: its owner with `submit`, anyone with `admin`.
    pub fn require_owner_or_admin(&self, owner: &str) -> Result<(), ServiceError> {
        self.require(Role::Submit)?;
        if self.role == Role::Admin || self.name == owner {
            Ok(())
        } else {
            Err(ServiceError::PermissionDenied(format!(
                "the job belongs to {owner}; {} may only change its own jobs (admin may change any)",
                self.name
            )))
        }
    }
}

struct Entry {
    digest: [u8; 32],
    caller: Caller,
}

/// The shortest token accepted: 128 bits of hex, or more of anything else.
const MIN_TOKEN_LEN: usize = 16;

/// A token file's tokens, parsed; `Err` names the line at fault (never its token).
fn parse(text: &str) -> Result<Vec<Entry>, String> {
    let mut entries: Vec<Entry> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(token), role, name, None) = (words.next(), words.next(), words.next(), words.next()) else {
            return Err(format!("line {}: expected TOKEN [ROLE [NAME]]", n + 1));
        };
        if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "line {}: a token is at least {MIN_TOKEN_LEN} printable ASCII characters",
                n + 1
            ));
        }
        let role = match role {
            None => Role::Submit,
            Some(r) => Role::parse(r)
                .ok_or_else(|| format!("line {}: role {r:?} is not read, submit or admin", n + 1))?,
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let name = name.map_or_else(|| format!("token-{}", &hex::encode(digest)[..8]), str::to_string);
        if entries.iter().any(|e| e.digest == digest) {
            return Err(format!("line {}: the same token as an earlier line", n + 1));
        }
        entries.push(Entry { digest, caller: Caller { name, role } });
    }
    Ok(entries)
}

/// The tokens of a token file, kept current.
pub struct Auth {
    path: PathBuf,
    entries: ArcSwap<Vec<Entry>>,
    /// SHA-256 of the file as last read, to tell a change from a poll.
    file_digest: std::sync::Mutex<[u8; 32]>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("path", &self.path).field("tokens", &self.entries.load().len()).finish()
    }
}

impl Auth {
    /// Reads `path`; an unreadable or malformed file is an error (the server does not start).
    pub fn load(path: &Path) -> Result<Auth, String> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let entries =
            parse(&String::from_utf8_lossy(&text)).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Auth {
            path: path.to_path_buf(),
            entries: ArcSwap::from_pointee(entries),
            file_digest: std::sync::Mutex::new(Sha256::digest(&text).into()),
        })
    }

    /// How many tokens are in force.
    pub fn len(&self) -> usize {
        self.entries.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file again; `Ok(true)` when its tokens changed. On error the tokens stay as they were.
    pub fn reload(&self) -> Result<bool, String> {
        let text = std::fs::read(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let digest: [u8; 32] = Sha256::digest(&text).into();
        let mut last = self.file_digest.lock().unwrap_or_else(|p| p.into_inner());
        if *last == digest {
            return Ok(false);
        }
        let entries =
            parse(&String::from_utf8_lossy(&text)).map_err(|e| format!("{}: {e}", self.path.display()))?;
        self.entries.store(Arc::new(entries));
        *last = digest;
        Ok(true)
    }

    /// The caller a request's `authorization: Bearer TOKEN` stands for.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, ServiceError> {
        let unauthenticated = |why: &str| ServiceError::Unauthenticated(why.to_string());
        let value = metadata
            .get("authorization")
            .ok_or_else(|| unauthenticated("missing authorization metadata (Bearer token)"))?;
        let value = value.to_str().map_err(|_| unauthenticated("authorization is not ASCII"))?;
        let token = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| unauthenticated("authorization is not \"Bearer TOKEN\""))?;
        self.authenticate_token(token)
    }

    /// The caller `token` stands for (the console's login and cookie).
    pub fn authenticate_token(&self, token: &str) -> Result<Caller, ServiceError> {
        let unauthenticated = |why: &str| ServiceError::Unauthenticated(why.to_string());
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let entries = self.entries.load();
        let mut found = None;
        for e in entries.iter() {
            // Every entry is compared, matched or not.
            if bool::from(e.digest.ct_eq(&digest)) {
                found = Some(&e.caller);
            }
        }
        found.cloned().ok_or_else(|| unauthenticated("unknown token"))
    }
}

/// The interceptor in front of the API (and of reflection, unless it is public): puts the [`Caller`]
/// of the request's token on it, or refuses the request.
pub fn interceptor(
    auth: Arc<Auth>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut request: tonic::Request<()>| {
        let caller = auth.authenticate(request.metadata()).map_err(|e| {
            tracing::debug!(error = %e, peer = ?request.remote_addr(), "request refused");
            tonic::Status::from(e)
        })?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    #[test]
    fn tokens_name_their_caller_and_role() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(
            &path,
            "# comment\n\nreader-token-0123456789 read ci\nsubmitter-token-0123456\nadmin-token-0123456789 admin ops\n",
        )
        .unwrap();
        let auth = Auth::load(&path).unwrap();
        assert_eq!(auth.len(), 3);
        let who = |v: &str| auth.authenticate(&metadata(v));
        assert_eq!(
            who("Bearer reader-token-0123456789").unwrap(),
            Caller { name: "ci".into(), role: Role::Read }
        );
        assert_eq!(who("bearer admin-token-0123456789").unwrap().role, Role::Admin);
        let submitter = who("Bearer submitter-token-0123456").unwrap();
        assert_eq!(submitter.role, Role::Submit);
        assert!(submitter.name.starts_with("token-") && submitter.name.len() == 14, "{}", submitter.name);
        for bad in
            ["Bearer nope-nope-nope-nope", "Basic reader-token-0123456789", "reader-token-0123456789", ""]
        {
            let e = who(bad).unwrap_err();
            assert!(matches!(e, ServiceError::Unauthenticated(_)), "{bad}: {e}");
            assert!(!e.to_string().contains("token-0123"), "the token is not echoed: {e}");
        }
        assert!(matches!(auth.authenticate(&MetadataMap::new()), Err(ServiceError::Unauthenticated(_))));
    }

    #[test]
    fn roles_include_the_ones_below() {
        let reader = Caller { name: "r".into(), role: Role::Read };
        let alice = Caller { name: "alice".into(), role: Role::Submit };
        let admin = Caller { name: "ops".into(), role: Role::Admin };
        reader.require(Role::Read).unwrap();
        assert!(matches!(reader.require(Role::Submit), Err(ServiceError::PermissionDenied(_))));
        alice.require(Role::Read).unwrap();
        alice.require_owner_or_admin("alice").unwrap();
        assert!(matches!(alice.require_owner_or_admin("bob"), Err(ServiceError::PermissionDenied(_))));
        assert!(reader.require_owner_or_admin("r").is_err(), "read cannot cancel even its own");
        admin.require_owner_or_admin("bob").unwrap();
    }

    #[test]
    fn a_bad_file_is_refused_and_a_bad_reload_keeps_the_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        for (text, wanted) in [
            ("short read\n", "line 1: a token is at least"),
            ("ok-token-0123456789 root\n", "role \"root\""),
            ("ok-token-0123456789 read a b\n", "expected TOKEN"),
            ("ok-token-0123456789\nok-token-0123456789 admin\n", "line 2: the same token"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Auth::load(&path).unwrap_err();
            assert!(e.contains(wanted), "{e}");
            assert!(!e.contains("ok-token"), "{e}");
        }
        std::fs::write(&path, "first-token-0123456789\n").unwrap();
        let auth = Auth::load(&path).unwrap();
        assert_eq!(auth.reload(), Ok(false), "unchanged");
        std::fs::write(&path, "second-token-0123456789 admin\n").unwrap();
        assert_eq!(auth.reload(), Ok(true));
        assert!(auth.authenticate(&metadata("Bearer first-token-0123456789")).is_err());
        assert_eq!(auth.authenticate(&metadata("Bearer second-token-0123456789")).unwrap().role, Role::Admin);
        std::fs::write(&path, "x\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.authenticate(&metadata("Bearer second-token-0123456789")).is_ok(), "kept");
        std::fs::remove_file(&path).unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.authenticate(&metadata("Bearer second-token-0123456789")).is_ok(), "kept");
    }
}
