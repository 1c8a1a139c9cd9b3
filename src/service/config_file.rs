//! `serve --config FILE`: a TOML file of `serve`'s long flags (`listen = "0.0.0.0:50051"`,
//! `model = ["cifar=/models/cifar"]`, `s3-path-style = true`). Each value becomes the default of the
//! flag's `DDPM_*` environment variable when that is unset, so the order of precedence is command-line
//! flags, then the environment, then the file, then built-in defaults.

use std::path::Path;

/// Reads `path` and returns the `(DDPM_VAR, value)` pairs it sets, checked against `command`'s flags.
pub fn env_defaults(command: &clap::Command, path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("--config {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()) && flag != "config")
            .ok_or_else(|| format!("--config {}: unknown setting {key:?}", path.display()))?;
        let env = arg
            .get_env()
            .and_then(|e| e.to_str())
            .ok_or_else(|| format!("--config {}: {key:?} cannot be set from a file", path.display()))?;
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s),
                    other => Err(format!(
                        "--config {}: {key:?} must be a list of strings, not {}",
                        path.display(),
                        other.type_str()
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            other => {
                return Err(format!(
                    "--config {}: {key:?}: a {} is not a flag value",
                    path.display(),
                    other.type_str()
                ));
            }
        };
        out.push((env.to_string(), text));
    }
    Ok(out)
}

/// The `--config` path among `serve`'s raw arguments (or `DDPM_CONFIG`).
pub fn config_path(args: &[std::ffi::OsString]) -> Option<std::path::PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().map(Into::into);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.into());
        }
    }
    std::env::var_os("DDPM_CONFIG").map(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Command};

    #[test]
    fn settings_map_to_their_environment_variables() {
        let command = crate::service::ServeArgs::augment_args(Command::new("serve"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:50051\"\nmodel = [\"a=/m/a\", \"b=org/b\"]\ns3_path_style = true\nlease-seconds = 30\n",
        )
        .unwrap();
        let mut pairs = env_defaults(&command, &path).unwrap();
        pairs.sort();
        assert_eq!(
            pairs,
            [
                ("DDPM_LEASE_SECONDS".to_string(), "30".to_string()),
                ("DDPM_LISTEN".into(), "0.0.0.0:50051".into()),
                ("DDPM_MODELS".into(), "a=/m/a,b=org/b".into()),
                ("DDPM_S3_PATH_STYLE".into(), "true".into()),
            ]
        );
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        assert!(env_defaults(&command, &path).unwrap_err().contains("unknown setting \"lisen\""));
        std::fs::write(&path, "model = [1]\n").unwrap();
        let err = env_defaults(&command, &path).unwrap_err();
        let expected =
            format!("--config {}: \"model\" must be a list of strings, not integer", path.display());
        assert_eq!(err, expected);
        let args: Vec<std::ffi::OsString> = ["serve", "--config=/x.toml"].iter().map(Into::into).collect();
        assert_eq!(config_path(&args), Some("/x.toml".into()));
    }
}
