//! What a module supplies: who it is ([`Descriptor`]), how it serves a data
//! connection, and its routes and config. Everything else (registration,
//! heartbeats, the ModuleService server, stats, rate limits, versions,
//! drain) is the SDK's.

use std::collections::HashMap;

use serde_yaml_ng::Value;
use shared_types::pb::{ModuleType, Protocol, Route};

use std::sync::Arc;

use crate::context::Context;
use crate::data::Connection;

/// Who a module is, as it registers with the NLB.
#[derive(Debug, Clone)]
pub struct Descriptor {
    pub module_type: ModuleType,
    /// Short lowercase name (`alb`, `echo`): logs, default instance ids.
    pub name: &'static str,
    /// The version this build runs, unless `version`/`MODULE_VERSION` says
    /// otherwise.
    pub version: String,
    /// Protocols it serves: what `CanHandle` accepts by default.
    pub protocols: Vec<Protocol>,
    /// Extra `capabilities` announced at registration (the SDK adds
    /// `proxy_protocol` itself from the config).
    pub capabilities: HashMap<String, String>,
}

/// An error a module reports to a ModuleService caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    /// The request is wrong; the message says how (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// The thing named does not exist (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// This module does not do that (FAILED_PRECONDITION).
    #[error("{0}")]
    Unsupported(String),
    /// It failed inside the module (INTERNAL).
    #[error("{0}")]
    Failed(String),
    /// Something the module depends on did not answer; worth retrying
    /// (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
}

impl ModuleError {
    pub fn code(&self) -> tonic::Code {
        match self {
            ModuleError::Invalid(_) => tonic::Code::InvalidArgument,
            ModuleError::NotFound(_) => tonic::Code::NotFound,
            ModuleError::Unsupported(_) => tonic::Code::FailedPrecondition,
            ModuleError::Failed(_) => tonic::Code::Internal,
            ModuleError::Unavailable(_) => tonic::Code::Unavailable,
        }
    }
}

/// A module's answer to `CanHandle`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CanHandle {
    pub can_handle: bool,
    pub priority: i32,
    pub reason: String,
    pub metadata: HashMap<String, String>,
}

/// A module's own health, merged into `HealthCheck` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Serving normally. `false` makes the instance DEGRADED.
    pub ok: bool,
    /// Named checks (`upstream.api`: `ok` / what failed).
    pub checks: HashMap<String, String>,
}

impl Health {
    pub fn ok() -> Self {
        Health {
            ok: true,
            checks: HashMap::new(),
        }
    }
}

/// One section of a module's runtime config, as `GetConfig` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSection {
    pub config_type: String,
    /// YAML or JSON text.
    pub data: Vec<u8>,
}

/// A module: implement this, then hand it to [`crate::run`].
///
/// `serve` is the data plane; the rest have defaults, so a module that only
/// serves connections implements two methods.
#[tonic::async_trait]
pub trait Module: Send + Sync + 'static {
    /// Who this module is. Called once at start.
    fn descriptor(&self) -> Descriptor;

    /// Called once at start, before the first connection: register the
    /// module's own metrics in `ctx.registry`, start background tasks (they
    /// may watch `ctx.stopping()` to end with the module).
    async fn start(&self, _ctx: Arc<Context>) -> Result<(), String> {
        Ok(())
    }

    /// Serves one data connection until it ends. The SDK has counted it and
    /// read the PROXY v2 header (when asked for); `conn.closing()` resolves
    /// when the SDK wants it to finish (drain, shed).
    async fn serve(&self, conn: Connection);

    /// The routes it serves now: announced at registration and listed by
    /// `GetRoutes`.
    fn routes(&self) -> Vec<Route> {
        Vec::new()
    }

    /// `CanHandle`: by default, any route whose protocol is one of the
    /// descriptor's protocols.
    async fn can_handle(&self, route: &Route, _context: &HashMap<String, String>) -> CanHandle {
        let protocols = self.descriptor().protocols;
        let proto = Protocol::try_from(route.protocol).unwrap_or(Protocol::Unspecified);
        if protocols.contains(&proto) {
            CanHandle {
                can_handle: true,
                priority: route.priority,
                reason: format!("serves {}", proto.as_str_name()),
                metadata: HashMap::new(),
            }
        } else {
            CanHandle {
                can_handle: false,
                priority: 0,
                reason: format!(
                    "serves {} only, not {}",
                    protocols
                        .iter()
                        .map(|p| p.as_str_name())
                        .collect::<Vec<_>>()
                        .join(", "),
                    proto.as_str_name()
                ),
                metadata: HashMap::new(),
            }
        }
    }

    /// `UpdateRoutes`: returns how many routes changed. The SDK announces the
    /// new routes to the NLB afterwards.
    async fn update_routes(
        &self,
        _routes: Vec<Route>,
        _replace_all: bool,
    ) -> Result<usize, ModuleError> {
        Err(ModuleError::Unsupported(format!(
            "module {} has fixed routes",
            self.descriptor().name
        )))
    }

    /// `DeleteRoute`.
    async fn delete_route(&self, _route_id: &str) -> Result<(), ModuleError> {
        Err(ModuleError::Unsupported(format!(
            "module {} has fixed routes",
            self.descriptor().name
        )))
    }

    /// `GetConfig`: the module's runtime config, by section. Leave secrets out.
    fn config(&self) -> Vec<ConfigSection> {
        Vec::new()
    }

    /// `UpdateConfig`: validate `data` for section `config_type` and, unless
    /// `validate_only`, apply it. Errors are the validation messages.
    async fn update_config(
        &self,
        config_type: &str,
        _data: &[u8],
        _validate_only: bool,
    ) -> Result<(), Vec<String>> {
        Err(vec![format!(
            "module {} has no runtime config section {config_type:?}",
            self.descriptor().name
        )])
    }

    /// `Reload` (and the NLB's `reload` instruction): `section` is the
    /// `module:` section of the config file as it reads now (`Null` without
    /// a file). Returns what changed.
    async fn reload(&self, _section: Value) -> Result<String, ModuleError> {
        Ok("nothing to reload".into())
    }

    /// Health beyond "the process runs": upstreams, caches. `deep` is the
    /// caller asking for the expensive checks.
    async fn health(&self, _deep: bool) -> Health {
        Health::ok()
    }

    /// Extra stats for `GetStats` and heartbeats (`custom_stats`).
    fn custom_stats(&self) -> HashMap<String, String> {
        HashMap::new()
    }
}

/// A route table a module can keep its routes in: upsert by `route_id`,
/// replace, delete, list in id order.
#[derive(Debug, Default)]
pub struct RouteStore {
    routes: parking_lot::RwLock<std::collections::BTreeMap<String, Route>>,
}

/// Most routes one module keeps.
pub const MAX_ROUTES: usize = 10_000;

impl RouteStore {
    pub fn new(routes: Vec<Route>) -> Result<Self, ModuleError> {
        let store = RouteStore::default();
        store.update(routes, true)?;
        Ok(store)
    }

    pub fn list(&self) -> Vec<Route> {
        self.routes.read().values().cloned().collect()
    }

    /// Upserts `routes` (or replaces all with them); returns how many were
    /// written. Every route needs a unique, non-empty `route_id`.
    pub fn update(&self, routes: Vec<Route>, replace_all: bool) -> Result<usize, ModuleError> {
        let mut seen = std::collections::HashSet::new();
        for (i, r) in routes.iter().enumerate() {
            if r.route_id.is_empty() {
                return Err(ModuleError::Invalid(format!(
                    "routes[{i}]: route_id is empty"
                )));
            }
            if !seen.insert(r.route_id.as_str()) {
                return Err(ModuleError::Invalid(format!(
                    "routes[{i}]: route_id {:?} appears twice",
                    r.route_id
                )));
            }
            if r.priority < 0 {
                return Err(ModuleError::Invalid(format!(
                    "routes[{i}] ({}): priority {} is negative (0 is the lowest)",
                    r.route_id, r.priority
                )));
            }
        }
        let mut table = self.routes.write();
        let base = if replace_all { 0 } else { table.len() };
        let added = routes
            .iter()
            .filter(|r| replace_all || !table.contains_key(&r.route_id))
            .count();
        if base + added > MAX_ROUTES {
            return Err(ModuleError::Invalid(format!(
                "{} routes would exceed the limit of {MAX_ROUTES}",
                base + added
            )));
        }
        if replace_all {
            table.clear();
        }
        let n = routes.len();
        for r in routes {
            table.insert(r.route_id.clone(), r);
        }
        Ok(n)
    }

    pub fn delete(&self, route_id: &str) -> Result<(), ModuleError> {
        match self.routes.write().remove(route_id) {
            Some(_) => Ok(()),
            None => Err(ModuleError::NotFound(format!("no route {route_id:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(id: &str, priority: i32) -> Route {
        Route {
            route_id: id.into(),
            protocol: Protocol::Tcp as i32,
            priority,
            ..Route::default()
        }
    }

    #[test]
    fn route_store_upserts_replaces_and_deletes_in_id_order() {
        let s = RouteStore::new(vec![route("b", 1), route("a", 1)]).unwrap();
        let ids = |s: &RouteStore| s.list().into_iter().map(|r| r.route_id).collect::<Vec<_>>();
        assert_eq!(ids(&s), ["a", "b"]);
        assert_eq!(s.update(vec![route("c", 2), route("a", 5)], false), Ok(2));
        assert_eq!(ids(&s), ["a", "b", "c"]);
        assert_eq!(s.list()[0].priority, 5);
        assert_eq!(s.update(vec![route("z", 0)], true), Ok(1));
        assert_eq!(ids(&s), ["z"]);
        assert_eq!(s.delete("z"), Ok(()));
        assert!(matches!(s.delete("z"), Err(ModuleError::NotFound(_))));
    }

    #[test]
    fn route_store_refuses_bad_routes_and_changes_nothing() {
        let s = RouteStore::new(vec![route("a", 1)]).unwrap();
        for bad in [
            vec![route("", 1)],
            vec![route("x", 1), route("x", 2)],
            vec![route("y", -1)],
        ] {
            assert!(matches!(s.update(bad, true), Err(ModuleError::Invalid(_))));
        }
        assert_eq!(s.list().len(), 1);
    }
}
