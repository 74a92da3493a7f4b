//! Who may change a module over ModuleService (DESIGN.md): reads are open;
//! anything that changes the module needs an `operator` or `nlb` token,
//! sent as `authorization: Bearer <token>` or `x-api-key: <token>`.
//!
//! Tokens come from `MODULE_OPERATOR_TOKEN`, `MODULE_NLB_TOKEN` and the
//! tokens file (`auth.tokens_file`, the NLB's format with roles `operator`
//! and `nlb`). With none, changes are open too, and the module says so
//! loudly at start. `Reload` re-reads the file; a bad file keeps the tokens
//! in force.

use std::collections::HashMap;
use std::path::Path;

use arc_swap::ArcSwap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::Status;

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Operator,
    Nlb,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Nlb => "nlb",
        }
    }
}

/// The caller of a changing RPC, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Option<Role>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    tokens: Vec<FileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: String,
    role: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
}

/// Tokens by SHA-256, with their name and role.
pub type Tokens = HashMap<[u8; 32], (String, Role)>;

/// The tokens in force.
pub struct ModuleAuth {
    tokens: ArcSwap<Tokens>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Loads the tokens from the environment and the file.
pub fn load_tokens(
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Tokens, String> {
    let mut tokens = Tokens::new();
    let mut add = |source: &str, name: String, role: Role, d: [u8; 32]| {
        if tokens.insert(d, (name.clone(), role)).is_some() {
            return Err(format!(
                "{source}: token of {name:?} is also another entry's token"
            ));
        }
        Ok(())
    };
    for (var, role) in [
        ("MODULE_OPERATOR_TOKEN", Role::Operator),
        ("MODULE_NLB_TOKEN", Role::Nlb),
    ] {
        if let Some(t) = env(var).filter(|t| !t.is_empty()) {
            if t.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "{var}: a token needs at least {MIN_TOKEN_LEN} characters"
                ));
            }
            add(var, var.to_string(), role, digest(&t))?;
        }
    }
    if let Some(path) = file {
        let src = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| format!("{src}: cannot read: {e}"))?;
        let doc: FileDoc = serde_yaml_ng::from_str(&text).map_err(|e| format!("{src}: {e}"))?;
        for (i, e) in doc.tokens.into_iter().enumerate() {
            let at = format!("{src}: tokens[{i}] ({})", e.name);
            let role = match e.role.as_str() {
                "operator" => Role::Operator,
                "nlb" => Role::Nlb,
                other => {
                    return Err(format!(
                        "{at}: role {other:?} is not one a module knows (operator, nlb)"
                    ))
                }
            };
            let d = match (e.token, e.sha256) {
                (Some(t), None) if t.len() >= MIN_TOKEN_LEN => digest(&t),
                (Some(_), None) => {
                    return Err(format!(
                        "{at}: a token needs at least {MIN_TOKEN_LEN} characters"
                    ))
                }
                (None, Some(h)) => {
                    let bytes = hex::decode(h.trim())
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .ok_or_else(|| format!("{at}: sha256 is not 64 hex digits"))?;
                    bytes
                }
                _ => return Err(format!("{at}: give exactly one of token and sha256")),
            };
            add(&src, e.name, role, d)?;
        }
    }
    Ok(tokens)
}

impl ModuleAuth {
    pub fn new(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        Ok(ModuleAuth {
            tokens: ArcSwap::from_pointee(load_tokens(file, env)?),
        })
    }

    /// Puts loaded tokens in force.
    pub fn replace(&self, tokens: Tokens) {
        self.tokens.store(tokens.into());
    }

    /// No tokens: everything is open.
    pub fn is_open(&self) -> bool {
        self.tokens.load().is_empty()
    }

    /// Checks the caller of a changing RPC (`method` names it in errors).
    pub fn check_change(&self, md: &MetadataMap, method: &str) -> Result<Caller, Status> {
        let tokens = self.tokens.load();
        if tokens.is_empty() {
            return Ok(Caller {
                name: "anonymous".into(),
                role: None,
            });
        }
        let presented = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .or_else(|| md.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim);
        let Some(token) = presented.filter(|t| !t.is_empty()) else {
            return Err(Status::unauthenticated(format!(
                "{method} changes this module: send an operator or nlb token \
                 (authorization: Bearer <token>, or x-api-key)"
            )));
        };
        match tokens.get(&digest(token)) {
            Some((name, role)) => Ok(Caller {
                name: name.clone(),
                role: Some(*role),
            }),
            None => Err(Status::unauthenticated(format!(
                "{method}: the token is not one this module knows"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn md(header: &str, value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(
            tonic::metadata::MetadataKey::from_bytes(header.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        m
    }

    #[test]
    fn open_without_tokens() {
        let a = ModuleAuth::new(None, &env_of(&[])).unwrap();
        assert!(a.is_open());
        assert!(a.check_change(&MetadataMap::new(), "Scale").is_ok());
    }

    #[test]
    fn tokens_from_env_and_file_with_roles() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens.yaml");
        let hashed = hex::encode(digest("file-operator-token-1"));
        std::fs::write(
            &f,
            format!(
                "tokens:\n  - {{name: nlb-a, role: nlb, token: file-nlb-token-123}}\n  - {{name: ops, role: operator, sha256: {hashed}}}\n"
            ),
        )
        .unwrap();
        let a = ModuleAuth::new(
            Some(&f),
            &env_of(&[("MODULE_OPERATOR_TOKEN", "env-operator-token-1")]),
        )
        .unwrap();
        let c = a
            .check_change(&md("authorization", "Bearer env-operator-token-1"), "Scale")
            .unwrap();
        assert_eq!(c.role, Some(Role::Operator));
        let c = a
            .check_change(&md("x-api-key", "file-nlb-token-123"), "Scale")
            .unwrap();
        assert_eq!((c.name.as_str(), c.role), ("nlb-a", Some(Role::Nlb)));
        let c = a
            .check_change(
                &md("authorization", "Bearer file-operator-token-1"),
                "Scale",
            )
            .unwrap();
        assert_eq!(c.name, "ops");
        let e = a.check_change(&MetadataMap::new(), "Scale").unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("Scale"), "{}", e.message());
        let e = a
            .check_change(
                &md("authorization", "Bearer wrong-token-wrong-token"),
                "Reload",
            )
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn bad_files_are_named_and_keep_the_tokens_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens.yaml");
        let a =
            ModuleAuth::new(None, &env_of(&[("MODULE_NLB_TOKEN", "nlb-token-abcdefgh")])).unwrap();
        for (body, want) in [
            (
                "tokens:\n  - {name: x, role: viewer, token: aaaaaaaaaaaaaaaaaaaa}\n",
                "role",
            ),
            ("tokens:\n  - {name: x, role: nlb, token: short}\n", "16"),
            ("tokens:\n  - {name: x, role: nlb, sha256: zz}\n", "hex"),
            ("tokens:\n  - {name: x, role: nlb}\n", "exactly one"),
        ] {
            std::fs::write(&f, body).unwrap();
            // Loading fails, so nothing replaces the tokens in force.
            let e = load_tokens(Some(&f), &env_of(&[])).unwrap_err();
            assert!(e.contains(want) && e.contains("tokens.yaml"), "{e}");
        }
        assert!(a
            .check_change(&md("x-api-key", "nlb-token-abcdefgh"), "Scale")
            .is_ok());
    }
}
