//! Where tokens come from: the tokens file (YAML) and the environment.
//!
//! ```yaml
//! tokens:
//!   - name: ops-alice          # who, as audit lines show it
//!     role: operator           # operator | viewer | module
//!     sha256: 9f86d08...       # hex SHA-256 of the token (preferred)
//!   - name: alb-1
//!     role: module
//!     token: "s3cr3t"          # or the token itself
//!     module_type: alb         # optional: may register only this type
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use shared_types::pb::ModuleType;

use super::{Principal, Role};

/// A token's SHA-256: tokens are looked up by digest, so the set holds no
/// secret a memory dump could replay and the lookup leaks nothing about it.
pub type Digest32 = [u8; 32];

/// Hashes a presented token.
pub fn digest(token: &str) -> Digest32 {
    Sha256::digest(token.as_bytes()).into()
}

/// Environment variables that each define one token of a role.
pub const ENV_TOKENS: &[(&str, Role)] = &[
    ("NLB_OPERATOR_TOKEN", Role::Operator),
    ("NLB_VIEWER_TOKEN", Role::Viewer),
    ("NLB_MODULE_TOKEN", Role::Module),
];

/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why tokens could not be loaded. Each names the file (or variable) and entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{source_name}: {message}")]
pub struct TokenError {
    pub source_name: String,
    pub message: String,
}

impl TokenError {
    fn new(source_name: impl Into<String>, message: impl Into<String>) -> Self {
        TokenError {
            source_name: source_name.into(),
            message: message.into(),
        }
    }
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
    #[serde(default)]
    module_type: Option<String>,
}

/// The tokens in force, by digest.
#[derive(Debug, Default, Clone)]
pub struct TokenSet {
    by_digest: HashMap<Digest32, Arc<Principal>>,
}

impl TokenSet {
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Who a presented token belongs to.
    pub fn lookup(&self, token: &str) -> Option<&Arc<Principal>> {
        self.by_digest.get(&digest(token))
    }

    fn insert(&mut self, source: &str, digest: Digest32, p: Principal) -> Result<(), TokenError> {
        if let Some(other) = self.by_digest.get(&digest) {
            return Err(TokenError::new(
                source,
                format!(
                    "token of {:?} is the same as the token of {:?}; each token must be unique",
                    p.name, other.name
                ),
            ));
        }
        self.by_digest.insert(digest, Arc::new(p));
        Ok(())
    }

    /// Adds the tokens of the environment variables in [`ENV_TOKENS`] that
    /// are set, named `env:<role>`.
    pub fn add_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), TokenError> {
        for (var, role) in ENV_TOKENS {
            let Some(token) = env(var) else { continue };
            let token = token.trim();
            check_strength(var, token)?;
            let p = Principal {
                name: format!("env:{}", role.name()),
                role: *role,
                module_type: None,
            };
            self.insert(var, digest(token), p)?;
        }
        Ok(())
    }

    /// Adds the tokens of a tokens file.
    pub fn add_file(&mut self, path: &Path) -> Result<(), TokenError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| TokenError::new(&source, format!("cannot read the tokens file: {e}")))?;
        self.add_text(&source, &text)
    }

    /// Adds the tokens of a tokens document (`source` names it in errors).
    pub fn add_text(&mut self, source: &str, text: &str) -> Result<(), TokenError> {
        let doc: FileDoc = if text.trim().is_empty() {
            FileDoc { tokens: Vec::new() }
        } else {
            serde_yaml_ng::from_str(text)
                .map_err(|e| TokenError::new(source, format!("not a valid tokens file: {e}")))?
        };
        let mut names = std::collections::HashSet::new();
        for (i, e) in doc.tokens.into_iter().enumerate() {
            let at = format!("{source}: tokens[{i}]");
            if e.name.trim().is_empty() {
                return Err(TokenError::new(at, "name is empty"));
            }
            if !names.insert(e.name.clone()) {
                return Err(TokenError::new(
                    at,
                    format!("name {:?} is used twice", e.name),
                ));
            }
            let at = format!("{source}: token {:?}", e.name);
            let role = Role::parse(&e.role).ok_or_else(|| {
                TokenError::new(
                    &at,
                    format!("role {:?} is not one of operator, viewer, module", e.role),
                )
            })?;
            let module_type = match e.module_type.as_deref() {
                None => None,
                Some(_) if role != Role::Module => {
                    return Err(TokenError::new(
                        &at,
                        "module_type restricts module tokens only",
                    ))
                }
                Some(t) => Some(
                    ModuleType::parse_name(t)
                        .ok()
                        .filter(|t| *t != ModuleType::Unspecified)
                        .ok_or_else(|| {
                            TokenError::new(&at, format!("module_type {t:?} is not a module type"))
                        })?,
                ),
            };
            let digest = match (e.token, e.sha256) {
                (Some(t), None) => {
                    check_strength(&at, &t)?;
                    digest(&t)
                }
                (None, Some(h)) => parse_digest(&h).ok_or_else(|| {
                    TokenError::new(&at, "sha256 must be 64 hex digits (sha256sum of the token)")
                })?,
                _ => return Err(TokenError::new(&at, "give exactly one of token or sha256")),
            };
            let p = Principal {
                name: e.name,
                role,
                module_type,
            };
            self.insert(&at, digest, p)?;
        }
        Ok(())
    }
}

fn check_strength(source: &str, token: &str) -> Result<(), TokenError> {
    if token.chars().count() < MIN_TOKEN_LEN {
        return Err(TokenError::new(
            source,
            format!("a token must be at least {MIN_TOKEN_LEN} characters"),
        ));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TokenError::new(
            source,
            "a token cannot contain spaces or control characters (it travels in a header)",
        ));
    }
    Ok(())
}

fn parse_digest(hex_text: &str) -> Option<Digest32> {
    let bytes = hex::decode(hex_text.trim()).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "0123456789abcdef-op";
    const T2: &str = "0123456789abcdef-mod";

    #[test]
    fn a_file_with_plain_and_hashed_tokens_loads() {
        let text = format!(
            "tokens:\n  - {{name: alice, role: operator, token: {T1}}}\n  - {{name: alb-1, role: module, module_type: alb, sha256: {}}}\n",
            hex::encode(digest(T2))
        );
        let mut set = TokenSet::default();
        set.add_text("t.yaml", &text).unwrap();
        assert_eq!(set.len(), 2);
        let alice = set.lookup(T1).unwrap();
        assert_eq!((alice.name.as_str(), alice.role), ("alice", Role::Operator));
        let alb = set.lookup(T2).unwrap();
        assert_eq!(alb.role, Role::Module);
        assert_eq!(alb.module_type, Some(ModuleType::Alb));
        assert!(set.lookup("not a token at all").is_none());
    }

    #[test]
    fn bad_entries_are_named() {
        let cases = [
            ("tokens: [{name: a, role: root, token: 0123456789abcdefg}]", "role \"root\""),
            ("tokens: [{name: a, role: viewer, token: short}]", "at least 16"),
            ("tokens: [{name: a, role: viewer}]", "exactly one of token or sha256"),
            ("tokens: [{name: a, role: viewer, sha256: abc}]", "64 hex digits"),
            (
                "tokens: [{name: a, role: viewer, token: 0123456789abcdefg, module_type: alb}]",
                "module tokens only",
            ),
            (
                "tokens: [{name: a, role: module, token: 0123456789abcdefg, module_type: ftp}]",
                "not a module type",
            ),
            (
                "tokens: [{name: a, role: viewer, token: 0123456789abcdefg}, {name: a, role: viewer, token: 0123456789abcdefh}]",
                "used twice",
            ),
            (
                "tokens: [{name: a, role: viewer, token: 0123456789abcdefg}, {name: b, role: operator, token: 0123456789abcdefg}]",
                "same as the token of \"a\"",
            ),
            ("tokens: [{name: a, role: viewer, token: x, extra: 1}]", "unknown field"),
            ("tokens: {a: 1}", "not a valid tokens file"),
        ];
        for (text, want) in cases {
            let err = TokenSet::default().add_text("t.yaml", text).unwrap_err();
            assert!(err.to_string().starts_with("t.yaml"), "{err}");
            assert!(err.to_string().contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn environment_tokens_have_their_role() {
        let env = |v: &str| match v {
            "NLB_OPERATOR_TOKEN" => Some(T1.to_string()),
            "NLB_MODULE_TOKEN" => Some(format!(" {T2}\n")),
            _ => None,
        };
        let mut set = TokenSet::default();
        set.add_env(&env).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set.lookup(T1).unwrap().name, "env:operator");
        assert_eq!(set.lookup(T2).unwrap().role, Role::Module);

        let weak = |v: &str| (v == "NLB_VIEWER_TOKEN").then(|| "abc".to_string());
        let err = TokenSet::default().add_env(&weak).unwrap_err();
        assert_eq!(err.source_name, "NLB_VIEWER_TOKEN");
    }

    #[test]
    fn an_empty_file_has_no_tokens() {
        let mut set = TokenSet::default();
        set.add_text("t.yaml", "").unwrap();
        set.add_text("t.yaml", "tokens: []").unwrap();
        assert!(set.is_empty());
    }
}
