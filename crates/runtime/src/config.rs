//! Layered configuration: compiled-in defaults, then an optional TOML file, then
//! environment variables `PREFIX__SECTION__KEY=value` (qdrant's convention), so that a
//! Kubernetes manifest can override one value without shipping a whole file.

use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("environment variable {name} cannot override a non-table value")]
    EnvPath { name: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Loads `T` from its defaults, an optional TOML file and `env_prefix__*` variables.
pub fn load_config<T>(file: Option<&Path>, env_prefix: &str) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    load_config_from(file, env_prefix, std::env::vars())
}

fn load_config_from<T>(
    file: Option<&Path>,
    env_prefix: &str,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut merged = toml::Value::try_from(T::default()).map_err(|error| ConfigError::Invalid(error.to_string()))?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let from_file: toml::Value =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.display().to_string(), source })?;
        merge(&mut merged, from_file);
    }
    let prefix = format!("{env_prefix}__");
    let mut overrides: Vec<(String, String)> = vars.filter(|(name, _)| name.starts_with(&prefix)).collect();
    // Sorted so that the result does not depend on the process's environment order.
    overrides.sort();
    for (name, raw) in overrides {
        let keys: Vec<String> = name[prefix.len()..].split("__").map(str::to_ascii_lowercase).collect();
        set_path(&mut merged, &keys, parse_env_value(&raw))
            .map_err(|()| ConfigError::EnvPath { name: name.clone() })?;
    }
    merged.try_into().map_err(|error: toml::de::Error| ConfigError::Invalid(error.to_string()))
}

fn merge(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(base), toml::Value::Table(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

fn set_path(root: &mut toml::Value, keys: &[String], value: toml::Value) -> Result<(), ()> {
    let Some((last, parents)) = keys.split_last() else {
        return Err(());
    };
    let mut node = root;
    for key in parents {
        let table = node.as_table_mut().ok_or(())?;
        node = table.entry(key.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    node.as_table_mut().ok_or(())?.insert(last.clone(), value);
    Ok(())
}

/// `42`, `true`, `1.5` and `["a", "b"]` keep their TOML type; anything else is a string.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("value = {raw}"))
        .ok()
        .and_then(|mut table| table.remove("value"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Sample {
        listen: String,
        workers: u32,
        nested: Nested,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq, Default)]
    #[serde(default)]
    struct Nested {
        enabled: bool,
        name: String,
    }

    impl Default for Sample {
        fn default() -> Self {
            Self { listen: "127.0.0.1:1".into(), workers: 2, nested: Nested::default() }
        }
    }

    #[test]
    fn defaults_apply_without_file_or_env() {
        let config: Sample = load_config_from(None, "X", std::iter::empty()).unwrap();
        assert_eq!(config, Sample::default());
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "workers = 8\n[nested]\nname = \"file\"\n").unwrap();
        let env = vec![
            ("X__NESTED__ENABLED".to_string(), "true".to_string()),
            ("X__NESTED__NAME".to_string(), "env".to_string()),
            ("OTHER__WORKERS".to_string(), "99".to_string()),
        ];
        let config: Sample = load_config_from(Some(&path), "X", env.into_iter()).unwrap();
        assert_eq!(config.workers, 8);
        assert_eq!(config.listen, "127.0.0.1:1");
        assert!(config.nested.enabled);
        assert_eq!(config.nested.name, "env");
    }

    #[test]
    fn malformed_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "workers = = 1").unwrap();
        let error = load_config_from::<Sample>(Some(&path), "X", std::iter::empty()).unwrap_err();
        assert!(error.to_string().contains("bad.toml"), "{error}");
    }

    #[test]
    fn wrongly_typed_env_value_is_rejected() {
        let env = vec![("X__WORKERS".to_string(), "many".to_string())];
        let error = load_config_from::<Sample>(None, "X", env.into_iter()).unwrap_err();
        assert!(matches!(error, ConfigError::Invalid(_)), "{error}");
    }
}
