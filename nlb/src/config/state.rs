//! The state file: the config sections operators changed through the API,
//! written atomically (temp file, fsync, rename, fsync of the directory) so a
//! crash leaves the old file or the new one, never a torn one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Sections;

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot write state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    /// Unix milliseconds of the last change.
    updated_at_ms: u64,
    sections: serde_json::Map<String, serde_json::Value>,
}

/// The API layer of the config, as persisted.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the persisted sections; a missing file is an empty layer.
    pub fn load(&self) -> Result<(Sections, u64), StateFileError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Sections::new(), 0)),
            Err(source) => {
                return Err(StateFileError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let parse_err = |message: String| StateFileError::Parse {
            path: self.path.clone(),
            message,
        };
        let disk: OnDisk = serde_json::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
        if disk.version != 1 {
            return Err(parse_err(format!(
                "unknown format version {}",
                disk.version
            )));
        }
        let mut sections = Sections::new();
        for (k, v) in disk.sections {
            let yaml = serde_yaml_ng::to_value(&v).map_err(|e| parse_err(e.to_string()))?;
            sections.insert(k, yaml);
        }
        Ok((sections, disk.updated_at_ms))
    }

    /// Writes the sections atomically.
    pub fn save(&self, sections: &Sections, updated_at_ms: u64) -> Result<(), StateFileError> {
        let write_err = |source: std::io::Error| StateFileError::Write {
            path: self.path.clone(),
            source,
        };
        let mut map = serde_json::Map::new();
        for (k, v) in sections {
            let json = serde_json::to_value(v)
                .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
            map.insert(k.clone(), json);
        }
        let disk = OnDisk {
            version: 1,
            updated_at_ms,
            sections: map,
        };
        let text = serde_json::to_vec_pretty(&disk)
            .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
        write_atomically(&self.path, &text).map_err(write_err)
    }

    /// Whether the state file's directory accepts writes (for health checks).
    /// A directory that does not exist yet is created by [`StateFile::save`],
    /// so the nearest existing ancestor is the one that must accept writes.
    pub fn writable(&self) -> bool {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let Some(existing) = dir
            .ancestors()
            .map(|d| {
                if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                }
            })
            .find(|d| d.exists())
        else {
            return false;
        };
        if !existing.is_dir() {
            return false;
        }
        // Permission bits do not tell (owner, root, read-only mounts): try.
        let probe = existing.join(format!(".nlb-write-probe-{}", std::process::id()));
        let ok = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&probe)
            .is_ok();
        let _ = std::fs::remove_file(&probe);
        ok
    }
}

/// Writes a file so that a crash leaves the old content or the new, never a
/// part: a temporary file in the same directory (created if missing),
/// flushed, renamed over `path`, then the directory synced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_save_would_create_counts_as_writable() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::new(dir.path().join("not/yet/nlb.state.json"));
        assert!(state.writable());
        state.save(&Sections::new(), 1).unwrap();
        assert!(state.path().is_file());
        assert!(StateFile::new("nlb.state.json").writable());
        assert!(StateFile::new("relative/dir/nlb.state.json").writable());
    }

    #[test]
    fn a_file_in_the_way_is_not_writable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("blocker"), "x").unwrap();
        let state = StateFile::new(dir.path().join("blocker/nlb.state.json"));
        assert!(!state.writable());
        assert!(state.save(&Sections::new(), 1).is_err());
    }
}
