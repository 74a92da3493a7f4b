//! Who may call what on the control API.
//!
//! Callers present a token as `authorization: Bearer <token>` or
//! `x-api-key: <token>`. A token carries a role (DESIGN.md, Security):
//! `module` (register, heartbeat, report, unregister: for its own instance
//! only), `viewer` (every read) and `operator` (everything). Tokens come from
//! the tokens file and the `NLB_*_TOKEN` variables ([`tokens`]); with none
//! configured the API is open and says so at start. The gRPC layer that
//! enforces the table is in [`layer`]; the per-instance binding of module
//! tokens is checked by the handlers, which know the registration.

pub mod layer;
pub mod tokens;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use shared_types::pb::ModuleType;
use tonic::Status;

pub use tokens::{TokenError, TokenSet};

/// A token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Module,
    Viewer,
    Operator,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "module" => Some(Role::Module),
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Module => "module",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }

    /// Whether this role meets `need`.
    pub fn allows(self, need: Need) -> bool {
        matches!(
            (self, need),
            (_, Need::Open | Need::Authenticated)
                | (Role::Operator, _)
                | (Role::Viewer, Need::Viewer)
                | (Role::Module, Need::Module)
        )
    }
}

/// The caller of a control API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name (`env:operator` for environment tokens); `anonymous`
    /// when the API is open.
    pub name: String,
    pub role: Role,
    /// A module token limited to registering instances of one type.
    pub module_type: Option<ModuleType>,
}

/// The name of the caller when no tokens are configured.
pub const ANONYMOUS: &str = "anonymous";

impl Principal {
    /// The caller of an open API: acts as an operator, binds nothing.
    pub fn anonymous() -> Arc<Principal> {
        Arc::new(Principal {
            name: ANONYMOUS.to_string(),
            role: Role::Operator,
            module_type: None,
        })
    }

    /// A caller without a valid token on an open method while auth is on:
    /// the least a role can be (a viewer that binds nothing).
    pub fn unauthenticated() -> Arc<Principal> {
        Arc::new(Principal {
            name: "unauthenticated".to_string(),
            role: Role::Viewer,
            module_type: None,
        })
    }

    pub fn is_anonymous(&self) -> bool {
        self.name == ANONYMOUS
    }

    /// The caller of `req`, as the auth layer recorded it (anonymous when
    /// the API is open or the call did not pass through the layer).
    pub fn of<T>(req: &tonic::Request<T>) -> Arc<Principal> {
        req.extensions()
            .get::<Arc<Principal>>()
            .cloned()
            .unwrap_or_else(Principal::anonymous)
    }

    /// Who owns what this caller registers: its token's name, or none when
    /// the API is open.
    pub fn owner(&self) -> Option<&str> {
        (!self.is_anonymous()).then_some(self.name.as_str())
    }

    /// A module token may act only for registrations it made; any other
    /// role may act for any.
    pub fn check_owns(&self, what: &str, owner: Option<&str>) -> Result<(), Status> {
        if self.role != Role::Module || owner == Some(self.name.as_str()) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "module token {:?} may act only for instances it registered; {what} was registered by another token",
            self.name
        )))
    }

    /// Methods a viewer may call as a dry run need an operator for real:
    /// `dry_run` says which this call is.
    pub fn check_may_change(&self, method: &str, dry_run: bool, flag: &str) -> Result<(), Status> {
        if dry_run || self.role == Role::Operator {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "token {:?} has role {}; {method} needs an operator token unless {flag} is set",
            self.name,
            self.role.name()
        )))
    }

    /// A module token limited to one module type may register only that type.
    pub fn check_module_type(&self, module_type: ModuleType) -> Result<(), Status> {
        match self.module_type {
            Some(t) if self.role == Role::Module && t != module_type => {
                Err(Status::permission_denied(format!(
                    "module token {:?} may register {} instances only, not {}",
                    self.name,
                    t.short_name(),
                    module_type.short_name()
                )))
            }
            _ => Ok(()),
        }
    }
}

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// No token: health checks (probes must not need secrets).
    Open,
    /// Any valid token: server reflection.
    Authenticated,
    Module,
    Viewer,
    Operator,
}

impl Need {
    pub fn name(self) -> &'static str {
        match self {
            Need::Open => "nothing",
            Need::Authenticated => "any valid token",
            Need::Module => "a module or operator token",
            Need::Viewer => "a viewer or operator token",
            Need::Operator => "an operator token",
        }
    }
}

const NLB_SERVICE: &str = "/marchproxy.NLBService/";

/// The method name of an `NLBService` path.
pub fn nlb_method(path: &str) -> Option<&str> {
    path.strip_prefix(NLB_SERVICE)
}

/// DESIGN.md's table: what each method of the control port needs. Methods
/// not listed (future extension RPCs included) need an operator.
/// `RouteRequest` is a read only as a dry run, and `UpdateRouting` and
/// `UpdateNLBConfig` only with `validate_only`: their handlers ask an
/// operator for the real thing ([`Principal::check_may_change`]).
pub fn need_for(path: &str) -> Need {
    if path.starts_with("/grpc.health.v1.Health/") {
        return Need::Open;
    }
    if path.starts_with("/grpc.reflection.") {
        return Need::Authenticated;
    }
    match nlb_method(path) {
        Some(
            "RegisterModule" | "Heartbeat" | "HeartbeatStream" | "ReportMetrics"
            | "UnregisterModule",
        ) => Need::Module,
        Some(
            "ListModules"
            | "GetModuleInfo"
            | "GetRoutingTable"
            | "RouteRequest"
            | "ValidateRoute"
            | "GetNLBMetrics"
            | "GetModuleMetrics"
            | "StreamNLBMetrics"
            | "CheckHealth"
            | "GetNLBStatus"
            | "GetNLBConfig"
            | "GetLoadDistribution"
            | "GetRollout"
            | "ListRollouts"
            | "WatchRollout"
            | "UpdateRouting"
            | "UpdateNLBConfig",
        ) => Need::Viewer,
        _ => Need::Operator,
    }
}

/// Why a call was refused before reaching its handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NoToken,
    BadToken,
    Forbidden {
        principal: Arc<Principal>,
        need: Need,
    },
}

impl Refusal {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoToken => "missing_token",
            Refusal::BadToken => "invalid_token",
            Refusal::Forbidden { .. } => "permission_denied",
        }
    }

    /// Who was refused: the token's principal, or `unauthenticated`.
    pub fn caller(&self) -> Arc<Principal> {
        match self {
            Refusal::Forbidden { principal, .. } => Arc::clone(principal),
            Refusal::NoToken | Refusal::BadToken => Principal::unauthenticated(),
        }
    }

    pub fn to_status(&self, method: &str) -> Status {
        match self {
            Refusal::NoToken => Status::unauthenticated(format!(
                "{method} needs a token: send `authorization: Bearer <token>` or `x-api-key: <token>`"
            )),
            Refusal::BadToken => Status::unauthenticated(format!(
                "{method}: the token presented is not valid"
            )),
            Refusal::Forbidden { principal, need } => Status::permission_denied(format!(
                "token {:?} has role {}; {method} needs {}",
                principal.name,
                principal.role.name(),
                need.name()
            )),
        }
    }
}

/// The tokens in force, and whether auth is on.
#[derive(Debug, Default)]
pub struct AuthState {
    pub enabled: bool,
    pub tokens: TokenSet,
}

/// Identifies a file's version on disk, to notice changes cheaply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp(Option<(SystemTime, u64, u64)>);

impl FileStamp {
    pub fn of(path: &Path) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp(std::fs::metadata(path).ok().map(|m| {
            (
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
                m.ino(),
            )
        }))
    }
}

/// The authenticator: the token set behind one atomic pointer, re-read from
/// the tokens file on SIGHUP or when the file changes.
pub struct Authenticator {
    state: ArcSwap<AuthState>,
    /// The file the tokens were last read from, and its version then.
    source: Mutex<Option<(PathBuf, FileStamp)>>,
}

impl Authenticator {
    /// Loads the tokens: the file (if configured) and the environment. A
    /// problem in either is an error: the NLB must not start open by
    /// accident of a typo.
    pub fn load(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, TokenError> {
        let (state, stamp) = read(file, env)?;
        Ok(Authenticator {
            state: ArcSwap::from_pointee(state),
            source: Mutex::new(file.map(|p| (p.to_path_buf(), stamp))),
        })
    }

    /// An open API (no tokens).
    pub fn open() -> Self {
        Authenticator {
            state: ArcSwap::from_pointee(AuthState::default()),
            source: Mutex::new(None),
        }
    }

    pub fn state(&self) -> arc_swap::Guard<Arc<AuthState>> {
        self.state.load()
    }

    pub fn enabled(&self) -> bool {
        self.state.load().enabled
    }

    /// Checks a call to `path` carrying `token`.
    pub fn check(&self, path: &str, token: Option<&str>) -> Result<Arc<Principal>, Refusal> {
        let need = need_for(path);
        let state = self.state.load();
        if !state.enabled {
            return Ok(Principal::anonymous());
        }
        let principal = match token.and_then(|t| state.tokens.lookup(t)) {
            Some(p) => Arc::clone(p),
            // Open methods (health) take anyone, as nobody in particular.
            None if need == Need::Open => return Ok(Principal::unauthenticated()),
            None if token.is_none() => return Err(Refusal::NoToken),
            None => return Err(Refusal::BadToken),
        };
        if principal.role.allows(need) {
            Ok(principal)
        } else {
            Err(Refusal::Forbidden { principal, need })
        }
    }

    /// Whether the tokens file changed on disk since it was read.
    pub fn file_changed(&self) -> bool {
        match &*self.source.lock() {
            Some((path, stamp)) => FileStamp::of(path) != *stamp,
            None => false,
        }
    }

    /// Re-reads the tokens from `file` and the environment. On an error the
    /// tokens in force stay. Auth never turns off without a restart: a
    /// reload that finds no tokens source keeps the tokens in force.
    /// Returns the number of tokens now in force.
    pub fn reload(
        &self,
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<usize, TokenError> {
        let mut source = self.source.lock();
        let (state, stamp) = read(file, env)?;
        if self.enabled() && !state.enabled {
            tracing::warn!(
                "the tokens file is no longer configured; the tokens in force stay until a restart (auth does not turn off at run time)"
            );
            return Ok(self.state.load().tokens.len());
        }
        let n = state.tokens.len();
        self.state.store(Arc::new(state));
        *source = file.map(|p| (p.to_path_buf(), stamp));
        Ok(n)
    }
}

fn read(
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(AuthState, FileStamp), TokenError> {
    let mut tokens = TokenSet::default();
    tokens.add_env(env)?;
    let mut stamp = FileStamp(None);
    if let Some(path) = file {
        // The stamp is taken before reading: a write racing the read is
        // seen as a change next time and read again.
        stamp = FileStamp::of(path);
        tokens.add_file(path)?;
        warn_if_readable_by_others(path);
    }
    let enabled = file.is_some() || !tokens.is_empty();
    Ok((AuthState { enabled, tokens }, stamp))
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", m.permissions().mode() & 0o777),
                "the tokens file can be read by other users; chmod 600 it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OP: &str = "operator-token-0123456789";
    const VIEW: &str = "viewer-token-0123456789";
    const MODULE: &str = "module-token-0123456789";

    fn env(v: &str) -> Option<String> {
        match v {
            "NLB_OPERATOR_TOKEN" => Some(OP.into()),
            "NLB_VIEWER_TOKEN" => Some(VIEW.into()),
            "NLB_MODULE_TOKEN" => Some(MODULE.into()),
            _ => None,
        }
    }

    fn path(m: &str) -> String {
        format!("/marchproxy.NLBService/{m}")
    }

    #[test]
    fn every_reference_rpc_has_the_role_design_gives_it() {
        let module = [
            "RegisterModule",
            "Heartbeat",
            "ReportMetrics",
            "UnregisterModule",
        ];
        let viewer = [
            "ListModules",
            "GetModuleInfo",
            "GetRoutingTable",
            "RouteRequest",
            "ValidateRoute",
            "GetNLBMetrics",
            "GetModuleMetrics",
            "StreamNLBMetrics",
            "CheckHealth",
            "GetNLBStatus",
            "GetNLBConfig",
            "GetLoadDistribution",
            // Real changes need an operator: their handlers check.
            "UpdateRouting",
            "UpdateNLBConfig",
        ];
        let operator = ["RebalanceLoad", "TriggerScaling", "SomeFutureRpc"];
        assert_eq!(module.len() + viewer.len() + operator.len() - 1, 20);
        let auth = Authenticator::load(None, &env).unwrap();
        for (m, module_ok, viewer_ok) in module
            .iter()
            .map(|m| (m, true, false))
            .chain(viewer.iter().map(|m| (m, false, true)))
            .chain(operator.iter().map(|m| (m, false, false)))
        {
            let p = path(m);
            assert!(auth.check(&p, Some(OP)).is_ok(), "operator may call {m}");
            assert_eq!(
                auth.check(&p, Some(MODULE)).is_ok(),
                module_ok,
                "module: {m}"
            );
            assert_eq!(auth.check(&p, Some(VIEW)).is_ok(), viewer_ok, "viewer: {m}");
            assert_eq!(auth.check(&p, None), Err(Refusal::NoToken), "{m}");
            assert_eq!(
                auth.check(&p, Some("wrong-token-0123456789")),
                Err(Refusal::BadToken),
                "{m}"
            );
        }
    }

    #[test]
    fn health_is_open_and_reflection_needs_any_token() {
        let auth = Authenticator::load(None, &env).unwrap();
        let p = auth.check("/grpc.health.v1.Health/Check", None).unwrap();
        assert_eq!((p.name.as_str(), p.role), ("unauthenticated", Role::Viewer));
        assert!(auth
            .check("/grpc.health.v1.Health/Check", Some("junk"))
            .is_ok());
        let refl = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        assert_eq!(auth.check(refl, None), Err(Refusal::NoToken));
        assert!(auth.check(refl, Some(MODULE)).is_ok());
    }

    #[test]
    fn with_no_tokens_everyone_is_an_anonymous_operator() {
        let auth = Authenticator::load(None, &|_| None).unwrap();
        assert!(!auth.enabled());
        let p = auth.check(&path("UpdateRouting"), None).unwrap();
        assert!(p.is_anonymous());
        assert_eq!(p.role, Role::Operator);
        assert_eq!(p.owner(), None);
    }

    #[test]
    fn module_tokens_act_only_for_their_own_registrations() {
        let m = Principal {
            name: "alb-1".into(),
            role: Role::Module,
            module_type: Some(ModuleType::Alb),
        };
        assert!(m.check_owns("instance alb-1", Some("alb-1")).is_ok());
        let err = m.check_owns("instance alb-2", Some("alb-2")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains("instance alb-2"),
            "{}",
            err.message()
        );
        assert!(m.check_owns("instance x", None).is_err());
        assert!(m.check_module_type(ModuleType::Alb).is_ok());
        assert!(m.check_module_type(ModuleType::Dblb).is_err());
        let op = Principal {
            name: "ops".into(),
            role: Role::Operator,
            module_type: None,
        };
        assert!(op.check_owns("instance alb-2", Some("alb-2")).is_ok());
    }

    #[test]
    fn a_changed_file_is_noticed_and_a_bad_one_keeps_the_tokens_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens.yaml");
        std::fs::write(
            &file,
            format!("tokens: [{{name: a, role: viewer, token: {VIEW}}}]"),
        )
        .unwrap();
        let auth = Authenticator::load(Some(&file), &|_| None).unwrap();
        assert!(auth.enabled());
        assert!(!auth.file_changed());
        assert!(auth.check(&path("ListModules"), Some(VIEW)).is_ok());

        std::fs::write(&file, "tokens: [{name: a, role: nobody, token: x}]").unwrap();
        assert!(auth.file_changed());
        assert!(auth.reload(Some(&file), &|_| None).is_err());
        assert!(auth.check(&path("ListModules"), Some(VIEW)).is_ok());

        std::fs::write(
            &file,
            format!("tokens: [{{name: b, role: operator, token: {OP}}}]"),
        )
        .unwrap();
        assert_eq!(auth.reload(Some(&file), &|_| None), Ok(1));
        assert!(!auth.file_changed());
        assert_eq!(
            auth.check(&path("ListModules"), Some(VIEW)),
            Err(Refusal::BadToken)
        );
        assert!(auth.check(&path("UpdateRouting"), Some(OP)).is_ok());

        // Dropping the file from the config does not open the API.
        assert_eq!(auth.reload(None, &|_| None), Ok(1));
        assert!(auth.enabled());
        assert_eq!(
            auth.check(&path("ListModules"), None),
            Err(Refusal::NoToken)
        );
    }

    #[test]
    fn a_configured_file_that_cannot_be_read_is_an_error_not_an_open_api() {
        let err = Authenticator::load(Some(Path::new("/nonexistent/tokens.yaml")), &|_| None)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("/nonexistent/tokens.yaml"),
            "{err}"
        );
    }
}
