//! A server process the tests start (SeaweedFS, NATS): run behind a shell watchdog that kills it when
//! the test process dies without running destructors (the watchdog's stdin pipe closes), its output in
//! a log file inside its own temporary directory, stopped on drop.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Runs "$@" in the background and kills it once stdin (fd 3 after the swap) reaches end of file.
const WATCHDOG: &str = r#"exec 3<&0
"$@" </dev/null 3<&- &
pid=$!
(read -r _ <&3; kill -KILL "$pid" 2>/dev/null) &
exec 3<&-
wait "$pid""#;

/// Tries to start a server: a free port may be taken again between our check and its bind.
const START_TRIES: usize = 3;

#[derive(Debug)]
pub struct Watched {
    child: Child,
    /// Closing it tells the watchdog to kill the server.
    watchdog: Option<ChildStdin>,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Watched {
    /// `program` behind the watchdog; add its arguments and environment, then [`Watched::spawn`] it.
    pub fn command(program: &Path) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(WATCHDOG).arg("sh").arg(program);
        command
    }

    /// Starts `command` in `dir`, with stdout and stderr in `dir/log_name`.
    pub fn spawn(mut command: Command, dir: tempfile::TempDir, log_name: &str) -> Result<Self, String> {
        let log = dir.path().join(log_name);
        let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = command
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {command:?}: {e}"))?;
        let watchdog = child.stdin.take();
        Ok(Self { child, watchdog, log, dir })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The exit status, if the server has stopped.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
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

    /// Stops the server and waits for it (idempotent).
    pub fn stop(&mut self) {
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

impl Drop for Watched {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server in `slot` that running tests share, started by `start` when there is none; it stops
/// when the last test drops its handle.
pub async fn shared<T, F: Future<Output = T>>(
    slot: &tokio::sync::Mutex<Weak<T>>,
    start: impl FnOnce() -> F,
) -> Arc<T> {
    let mut slot = slot.lock().await;
    if let Some(server) = slot.upgrade() {
        return server;
    }
    let server = Arc::new(start().await);
    *slot = Arc::downgrade(&server);
    server
}

/// Calls `try_start` until it succeeds, at most a few times; panics with every failure.
pub async fn start_with_retries<T, F: Future<Output = Result<T, String>>>(
    what: &str,
    mut try_start: impl FnMut() -> F,
) -> T {
    let mut failures = Vec::new();
    for _ in 0..START_TRIES {
        match try_start().await {
            Ok(server) => return server,
            Err(e) => failures.push(e),
        }
    }
    panic!("{what} did not start ({START_TRIES} tries):\n{}", failures.join("\n---\n"));
}

/// `N` distinct ports that are free right now (all held open together, so no two are the same).
pub fn free_ports<const N: usize>() -> Result<[u16; N], String> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("finding free ports: {e}"))?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr().map_err(|e| format!("finding free ports: {e}"))?.port();
    }
    Ok(ports)
}
