//! The NLB's configuration: one validated model, whatever the source.
//!
//! Layers, lowest first: the YAML file, the sections operators changed through
//! the API (persisted in the state file), then environment variables
//! (`NLB_GRPC_LISTEN`, `NLB_ADMIN_LISTEN`, `NLB_STATE_FILE`, the TLS file
//! paths and `NLB_TOKENS_FILE`), which pin what a deployment decides. Every key and default is listed in
//! `docs/configuration.md`.

mod model;
mod state;
mod store;
mod validate;

pub use model::*;
pub use state::{write_atomically, StateFile, StateFileError};
pub use store::{ConfigStore, SectionChange, UpdateError};
pub use validate::check_routes;
pub use validate::{check, check_host_port, listener_protocol, ConfigError};

use std::collections::BTreeMap;
use std::path::Path;

use serde_yaml_ng::Value;

/// Environment variables that override config keys.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("NLB_GRPC_LISTEN", "grpc.listen"),
    ("NLB_ADMIN_LISTEN", "admin.listen"),
    ("NLB_STATE_FILE", "state_file"),
    ("NLB_GRPC_TLS_CERT", "tls.grpc.cert_file"),
    ("NLB_GRPC_TLS_KEY", "tls.grpc.key_file"),
    ("NLB_GRPC_TLS_CLIENT_CA", "tls.grpc.client_ca_file"),
    ("NLB_ADMIN_TLS_CERT", "tls.admin.cert_file"),
    ("NLB_ADMIN_TLS_KEY", "tls.admin.key_file"),
    ("NLB_ADMIN_TLS_CLIENT_CA", "tls.admin.client_ca_file"),
    ("NLB_TOKENS_FILE", "auth.tokens_file"),
];

/// Sections only the config file and the environment may set: whoever holds
/// an operator token must not be able to turn security off through the API.
pub const FILE_ONLY_SECTIONS: &[&str] = &["state_file", "tls", "auth"];

/// Top-level sections that take effect only after a restart.
pub const RESTART_SECTIONS: &[&str] = &["grpc", "admin", "state_file"];

/// The sections of the config, in the order they are shown.
pub const SECTIONS: &[&str] = &[
    "grpc",
    "admin",
    "state_file",
    "registry",
    "health",
    "routing",
    "backends",
    "routes",
    "traffic_weights",
    "metrics",
    "tls",
    "auth",
    "listeners",
    "dataplane",
    "autoscaling",
];

/// Whether changing `section` needs a restart.
pub fn requires_restart(section: &str) -> bool {
    RESTART_SECTIONS.contains(&section)
}

/// The config file's sections as given (absent sections are absent).
pub type Sections = BTreeMap<String, Value>;

/// Reads a YAML config file into sections, checking only that it is a YAML
/// mapping. An empty file is an empty config.
pub fn read_file(path: &Path) -> Result<Sections, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        )]
    })?;
    parse_sections(&text)
}

/// Parses YAML (or JSON, a subset of YAML) text into sections.
pub fn parse_sections(text: &str) -> Result<Sections, Vec<ConfigError>> {
    let value: Value = serde_yaml_ng::from_str(text)
        .map_err(|e| vec![ConfigError::new("", format!("not valid YAML: {e}"))])?;
    match value {
        Value::Null => Ok(Sections::new()),
        Value::Mapping(map) => {
            let mut out = Sections::new();
            for (k, v) in map {
                match k {
                    Value::String(k) => {
                        out.insert(k, v);
                    }
                    other => {
                        return Err(vec![ConfigError::new(
                            "",
                            format!("top-level keys must be strings, found {other:?}"),
                        )])
                    }
                }
            }
            Ok(out)
        }
        _ => Err(vec![ConfigError::new(
            "",
            "the config must be a YAML mapping of sections",
        )]),
    }
}

/// Merges layers and validates: file sections, then API sections (each
/// replaces the whole section), then environment overrides.
pub fn merge(
    file: &Sections,
    api: &Sections,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<NlbConfig, Vec<ConfigError>> {
    let mut merged = file.clone();
    for (k, v) in api {
        merged.insert(k.clone(), v.clone());
    }
    let mut config = check(&merged)?;
    let mut errors = Vec::new();
    for (var, key) in ENV_OVERRIDES {
        if let Some(value) = env(var).filter(|v| !v.trim().is_empty()) {
            match *key {
                "grpc.listen" => config.grpc.listen = value,
                "admin.listen" => config.admin.listen = value,
                "state_file" => config.state_file = value.into(),
                "tls.grpc.cert_file" => tls(&mut config.tls.grpc).cert_file = value.into(),
                "tls.grpc.key_file" => tls(&mut config.tls.grpc).key_file = value.into(),
                "tls.grpc.client_ca_file" => {
                    tls(&mut config.tls.grpc).client_ca_file = Some(value.into())
                }
                "tls.admin.cert_file" => tls(&mut config.tls.admin).cert_file = value.into(),
                "tls.admin.key_file" => tls(&mut config.tls.admin).key_file = value.into(),
                "tls.admin.client_ca_file" => {
                    tls(&mut config.tls.admin).client_ca_file = Some(value.into())
                }
                "auth.tokens_file" => config.auth.tokens_file = Some(value.into()),
                _ => {}
            }
        }
    }
    validate::check_listen(
        &config.grpc.listen,
        "grpc.listen (or NLB_GRPC_LISTEN)",
        &mut errors,
    );
    validate::check_listen(
        &config.admin.listen,
        "admin.listen (or NLB_ADMIN_LISTEN)",
        &mut errors,
    );
    for (port, files) in [("grpc", &config.tls.grpc), ("admin", &config.tls.admin)] {
        if let Some(files) = files {
            validate::check_tls_files(port, files, &mut errors);
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

/// A port's TLS entry, created empty when an environment variable is the
/// first to name one of its files.
fn tls(port: &mut Option<TlsFiles>) -> &mut TlsFiles {
    port.get_or_insert_with(TlsFiles::default)
}

/// The process environment, for [`merge`].
pub fn process_env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

/// One section of a config as a YAML value (for `GetNLBConfig`).
pub fn section_value(config: &NlbConfig, section: &str) -> Option<Value> {
    let Value::Mapping(map) = serde_yaml_ng::to_value(config).ok()? else {
        return None;
    };
    map.get(section).cloned()
}
