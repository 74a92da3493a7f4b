//! The config in force and its layers: the file, the API layer (persisted in
//! the state file) and the environment. Changes are validated before they are
//! swapped in; a bad change leaves the config as it was.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde_yaml_ng::Value;

use super::{
    merge, read_file, requires_restart, ConfigError, NlbConfig, Sections, StateFile, SECTIONS,
};

type Env = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

struct Layers {
    file: Sections,
    api: Sections,
    updated_at_ms: u64,
    /// When the file was last read, in Unix milliseconds.
    file_read_ms: u64,
    /// When each API section last changed (from the state file at start).
    api_times: std::collections::BTreeMap<String, u64>,
}

/// Why a section change was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The new section does not validate with the rest of the config.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<ConfigError>),
    /// It validated, but the state file could not be written; nothing changed.
    #[error("{0}; the change was not applied")]
    Persist(#[from] super::StateFileError),
}

impl UpdateError {
    /// The validation errors (empty for a persist failure).
    pub fn invalid(&self) -> &[ConfigError] {
        match self {
            UpdateError::Invalid(e) => e,
            UpdateError::Persist(_) => &[],
        }
    }
}

/// The result of a section change.
#[derive(Debug, Clone)]
pub struct SectionChange {
    pub config: Arc<NlbConfig>,
    /// The section's new value differs from the one in force.
    pub changed: bool,
    /// The change takes effect only after a restart.
    pub requires_restart: bool,
}

/// The config in force.
pub struct ConfigStore {
    file_path: Option<PathBuf>,
    layers: Mutex<Layers>,
    state: StateFile,
    current: ArcSwap<NlbConfig>,
    /// The config the process started with (for `requires_restart`).
    boot: Arc<NlbConfig>,
    env: Env,
}

fn one(e: impl std::fmt::Display) -> Vec<ConfigError> {
    vec![ConfigError::new("", e.to_string())]
}

impl ConfigStore {
    /// Loads the file (if any), the environment and the state file it names.
    pub fn load(file_path: Option<PathBuf>, env: Env) -> Result<Self, Vec<ConfigError>> {
        let file = match &file_path {
            Some(p) => read_file(p)?,
            None => Sections::new(),
        };
        // The state file's location comes from the file and environment alone.
        let base = merge(&file, &Sections::new(), &*env)?;
        let state = StateFile::new(base.state_file.clone());
        let (mut api, updated_at_ms) = state.load().map_err(one)?;
        // The API cannot write these; a state file that holds them was
        // edited by hand, and it does not get to change security settings.
        for section in super::FILE_ONLY_SECTIONS {
            if api.remove(*section).is_some() {
                tracing::warn!(
                    section,
                    state_file = %state.path().display(),
                    "ignoring a section the API cannot set, found in the state file"
                );
            }
        }
        let config = merge(&file, &api, &*env).map_err(|errs| {
            errs.into_iter()
                .map(|e| {
                    ConfigError::new(
                        e.key,
                        format!("{} (after applying {})", e.message, state.path().display()),
                    )
                })
                .collect::<Vec<_>>()
        })?;
        let config = Arc::new(config);
        Ok(ConfigStore {
            file_path,
            layers: Mutex::new(Layers {
                api_times: api.keys().map(|k| (k.clone(), updated_at_ms)).collect(),
                file,
                api,
                updated_at_ms,
                file_read_ms: shared_types::time::unix_millis(SystemTime::now()),
            }),
            state,
            current: ArcSwap::new(Arc::clone(&config)),
            boot: config,
            env,
        })
    }

    /// The merged config in force.
    pub fn current(&self) -> Arc<NlbConfig> {
        self.current.load_full()
    }

    pub fn file_path(&self) -> Option<&PathBuf> {
        self.file_path.as_ref()
    }

    pub fn state_file(&self) -> &StateFile {
        &self.state
    }

    /// Unix milliseconds of the last API change (0 = none).
    pub fn updated_at_ms(&self) -> u64 {
        self.layers.lock().updated_at_ms
    }

    /// When a section last changed, in Unix milliseconds: its last API change
    /// if the API layer holds it, else when the file was last read.
    pub fn section_updated_ms(&self, section: &str) -> u64 {
        let layers = self.layers.lock();
        layers
            .api_times
            .get(section)
            .copied()
            .unwrap_or(layers.file_read_ms)
    }

    /// An environment variable, through the same source the config's
    /// overrides come from (tests inject their own).
    pub fn env_var(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.trim().is_empty())
    }

    /// The sections the API layer overrides.
    pub fn api_sections(&self) -> Vec<String> {
        self.layers.lock().api.keys().cloned().collect()
    }

    /// Validates a new value for one section against everything else in
    /// force; unless `validate_only`, persists it and swaps it in. A null
    /// value (empty `config_data`) drops the section from the API layer, so
    /// the file's section (or the default) applies again. `state_file` is not
    /// settable here: the state file's own location comes from the file or
    /// `NLB_STATE_FILE`.
    pub fn update_section(
        &self,
        section: &str,
        value: Value,
        validate_only: bool,
    ) -> Result<SectionChange, UpdateError> {
        self.modify_section(section, validate_only, |_| Ok(value))
    }

    /// Like [`ConfigStore::update_section`], with the new value computed from
    /// the config in force while no other change can interleave (a
    /// read-modify-write, such as upserting one route).
    pub fn modify_section(
        &self,
        section: &str,
        validate_only: bool,
        f: impl FnOnce(&NlbConfig) -> Result<Value, UpdateError>,
    ) -> Result<SectionChange, UpdateError> {
        if !SECTIONS.contains(&section) {
            return Err(UpdateError::Invalid(vec![ConfigError::new(
                section,
                format!("unknown section (known: {})", SECTIONS.join(", ")),
            )]));
        }
        if super::FILE_ONLY_SECTIONS.contains(&section) {
            let why = match section {
                "state_file" => "is set by the config file or NLB_STATE_FILE, not through the API (the state file cannot move itself)",
                _ => "is set by the config file or the environment, not through the API (security settings are not changed remotely)",
            };
            return Err(UpdateError::Invalid(vec![ConfigError::new(section, why)]));
        }
        let mut layers = self.layers.lock();
        let value = f(&self.current())?;
        let mut api = layers.api.clone();
        if value.is_null() {
            api.remove(section);
        } else {
            api.insert(section.to_string(), value);
        }
        let config = Arc::new(merge(&layers.file, &api, &*self.env).map_err(UpdateError::Invalid)?);
        let old = self.current();
        let changed = super::section_value(&old, section) != super::section_value(&config, section);
        let restart = requires_restart(section)
            && super::section_value(&self.boot, section) != super::section_value(&config, section);
        if !validate_only {
            let now = shared_types::time::unix_millis(SystemTime::now());
            self.state.save(&api, now)?;
            if api.contains_key(section) {
                layers.api_times.insert(section.to_string(), now);
            } else {
                layers.api_times.remove(section);
            }
            layers.api = api;
            layers.updated_at_ms = now;
            self.current.store(Arc::clone(&config));
        }
        Ok(SectionChange {
            config,
            changed,
            requires_restart: restart,
        })
    }

    /// Re-reads the config file (SIGHUP) and re-applies the API layer on top.
    pub fn reload(&self) -> Result<SectionChange, Vec<ConfigError>> {
        let mut layers = self.layers.lock();
        let file = match &self.file_path {
            Some(p) => read_file(p)?,
            None => Sections::new(),
        };
        let config = Arc::new(merge(&file, &layers.api, &*self.env)?);
        let restart = SECTIONS.iter().any(|s| {
            requires_restart(s)
                && super::section_value(&self.boot, s) != super::section_value(&config, s)
        });
        let changed = *self.current() != *config;
        layers.file = file;
        layers.file_read_ms = shared_types::time::unix_millis(SystemTime::now());
        self.current.store(Arc::clone(&config));
        Ok(SectionChange {
            config,
            changed,
            requires_restart: restart,
        })
    }
}
