//! Shared helpers for the integration tests: the fixture folder written by `tests/fixtures/gen_fixtures.py`,
//! a real S3 server ([`seaweed`]) and a real NATS server ([`nats`]).
#![allow(dead_code)]

pub mod nats;
pub mod outage;
pub mod pki;
pub mod process;
pub mod seaweed;
pub mod service;

use std::collections::HashMap;
use std::path::PathBuf;

use tch::Tensor;

/// Runs `script` (a path in the repository) with the project venv's python (`DDPM_PYTHON`, set by
/// `make test`), `args` and the variables `envs`; fails the test with the script's output unless it
/// exits 0.
pub fn python(script: &str, args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let python = std::env::var("DDPM_PYTHON").expect("DDPM_PYTHON is not set: run `make test`");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let out =
        std::process::Command::new(python).arg(path).args(args).envs(envs.iter().copied()).output().unwrap();
    assert!(
        out.status.success(),
        "{script} {}: {}{}",
        args.first().copied().unwrap_or_default(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The folder of golden outputs. `make test` generates it and sets `DDPM_FIXTURES`.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("DDPM_FIXTURES").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "DDPM_FIXTURES is not set: run `make test`, or `python tests/fixtures/gen_fixtures.py DIR` \
             with the project venv and export DDPM_FIXTURES=DIR"
        )
    });
    assert!(
        dir.join("manifest.json").is_file(),
        "{} holds no manifest.json; regenerate the fixtures",
        dir.display()
    );
    dir
}

pub fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("fixture manifest");
    serde_json::from_str(&text).expect("fixture manifest is JSON")
}

pub fn load(path: impl Into<PathBuf>) -> HashMap<String, Tensor> {
    let path = path.into();
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double)).abs().max().double_value(&[])
}

/// Fraction of `u8` values of `a` within `tol` of `b`.
pub fn fraction_within(a: &[u8], b: &[u8], tol: u8) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let ok = a.iter().zip(b).filter(|(x, y)| x.abs_diff(**y) <= tol).count();
    ok as f64 / a.len() as f64
}

/// The release binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ddpm-worker"))
}

/// A server binary the tests start: `$env_var`, else `name` in the project venv (where `make setup`
/// installs `package` from scripts/requirements-services.txt). Panics when missing: tests that need
/// the server must not pass without it.
pub fn venv_binary(env_var: &str, name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os(env_var).map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache/ddpm-worker/venv/bin").join(name)
    });
    assert!(
        path.is_file(),
        "{} is missing: run `make test` (`make setup` installs {package} into the project venv), or point \
         {env_var} at a `{name}` binary",
        path.display()
    );
    path
}

/// Waits for `child` at most `limit`; kills it and returns `None` if it is still running then.
pub fn wait_or_kill(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A name no other test uses (namespaces, prefixes), so tests sharing a server cannot see each other.
pub fn unique_name(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4().simple())
}
