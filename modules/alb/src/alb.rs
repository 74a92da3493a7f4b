//! The ALB as a module: its state (routes, clusters, TLS, limits) behind
//! atomic swaps, and the SDK's `Module` trait over it.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arc_swap::{ArcSwap, Guard};
use parking_lot::Mutex;
use shared_types::pb::{ModuleType, Protocol, Route};
use switchyard_sdk::{ConfigSection, Connection, Context, Descriptor, Health, Module, ModuleError};

use crate::config::{AlbConfig, Limits};
use crate::metrics::{AlbMetrics, RouteMetrics};
use crate::routes::{RouteSpec, RouteTable};
use crate::tls::CertStore;
use crate::upstream::{Upstream, Upstreams};

/// FNV-1a, for the maps every request looks up (clusters and route
/// metrics by name). Their keys come from the config, not from clients, so
/// SipHash's resistance to chosen keys buys nothing there and costs a
/// hundred-odd instructions a lookup.
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// A map keyed by config names, hashed with [`Fnv`].
pub type NameMap<V> = HashMap<String, V, std::hash::BuildHasherDefault<Fnv>>;

/// The state one request reads, swapped whole on a change.
pub struct Alb {
    config: ArcSwap<AlbConfig>,
    routes: ArcSwap<RouteTable>,
    upstreams: ArcSwap<Upstreams>,
    tls: OnceLock<(Arc<CertStore>, Arc<rustls::ServerConfig>)>,
    metrics: OnceLock<AlbMetrics>,
    /// Each route's metric series, rebuilt with the route table.
    route_metrics: ArcSwap<NameMap<Arc<RouteMetrics>>>,
    /// Serializes changes (UpdateRoutes, UpdateConfig, reload).
    change: Mutex<()>,
}

impl Alb {
    /// Builds the ALB from its validated config. Clusters' health checks
    /// start in [`Module::start`].
    pub fn new(config: AlbConfig) -> Result<Self, Vec<String>> {
        config.validate()?;
        let routes = RouteTable::build(config.routes.clone()).map_err(|e| vec![e.to_string()])?;
        let upstreams = Upstreams::build(&config.clusters, false).map_err(|e| vec![e])?;
        let tls = OnceLock::new();
        if let Some(spec) = &config.tls {
            let store = Arc::new(CertStore::load(spec).map_err(|e| vec![format!("tls: {e}")])?);
            let server = crate::tls::server_config(store.clone());
            let _ = tls.set((store, server));
        }
        Ok(Alb {
            config: ArcSwap::from_pointee(config),
            routes: ArcSwap::from_pointee(routes),
            upstreams: ArcSwap::from_pointee(upstreams),
            tls,
            metrics: OnceLock::new(),
            route_metrics: ArcSwap::from_pointee(NameMap::default()),
            change: Mutex::new(()),
        })
    }

    pub fn routes(&self) -> Guard<Arc<RouteTable>> {
        self.routes.load()
    }

    pub fn upstream(&self, cluster: &str) -> Option<Arc<Upstream>> {
        self.upstreams.load().by_name.get(cluster).cloned()
    }

    pub fn limits(&self) -> Limits {
        self.config.load().limits.clone()
    }

    pub fn access_log(&self) -> bool {
        self.config.load().access_log
    }

    /// The limits and whether to log each request: what a request reads of
    /// the config, in one load.
    pub fn request_settings(&self) -> (Limits, bool) {
        let c = self.config.load();
        (c.limits.clone(), c.access_log)
    }

    pub fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.tls.get().map(|(_, c)| c.clone())
    }

    pub fn metrics(&self) -> &AlbMetrics {
        self.metrics
            .get()
            .expect("metrics are registered in Module::start, before any connection")
    }

    /// The metric series of `route` (`-` for requests no route matched).
    pub fn route_metrics(&self, route: &str) -> Arc<RouteMetrics> {
        if let Some(m) = self.route_metrics.load().get(route) {
            return m.clone();
        }
        Arc::new(RouteMetrics::new(self.metrics(), route))
    }

    fn refresh_route_metrics(&self) {
        let Some(m) = self.metrics.get() else { return };
        let routes = self.routes.load();
        let mut map: NameMap<Arc<RouteMetrics>> = NameMap::default();
        for r in routes.routes() {
            let series = Arc::new(RouteMetrics::new(m, r.id()));
            r.set_metrics(series.clone());
            map.insert(r.id().to_string(), series);
        }
        map.insert("-".into(), Arc::new(RouteMetrics::new(m, "-")));
        self.route_metrics.store(Arc::new(map));
    }

    /// Puts a new config in force: routes and clusters swap atomically;
    /// requests in flight finish on what they started with.
    fn apply(&self, config: AlbConfig) -> Result<(), Vec<String>> {
        config.validate()?;
        let routes = RouteTable::build(config.routes.clone()).map_err(|e| vec![e.to_string()])?;
        let clusters_changed = config.clusters != self.config.load().clusters;
        if clusters_changed {
            let upstreams = Upstreams::build(&config.clusters, true).map_err(|e| vec![e])?;
            self.upstreams.store(Arc::new(upstreams));
        }
        self.routes.store(Arc::new(routes));
        self.config.store(Arc::new(config));
        self.refresh_route_metrics();
        Ok(())
    }
}

/// A shared ALB, so the `Module` impl can hand `Arc`s to connections.
pub struct AlbModule(pub Arc<Alb>);

fn invalid(errors: Vec<String>) -> ModuleError {
    ModuleError::Invalid(errors.join("; "))
}

#[switchyard_sdk::async_trait]
impl Module for AlbModule {
    fn descriptor(&self) -> Descriptor {
        Descriptor {
            module_type: ModuleType::Alb,
            name: "alb",
            version: env!("CARGO_PKG_VERSION").into(),
            protocols: vec![
                Protocol::Http,
                Protocol::Https,
                Protocol::Http2,
                Protocol::Grpc,
                Protocol::Websocket,
            ],
            capabilities: HashMap::from([
                (
                    "tls_termination".to_string(),
                    self.0.tls.get().is_some().to_string(),
                ),
                ("websocket".to_string(), "true".to_string()),
            ]),
        }
    }

    async fn start(&self, ctx: Arc<Context>) -> Result<(), String> {
        let metrics = AlbMetrics::new(&ctx.registry).map_err(|e| format!("metrics: {e}"))?;
        let _ = self.0.metrics.set(metrics);
        self.0.refresh_route_metrics();
        // The clusters built at load had no runtime for their health
        // checks: build them again with the checks running.
        let clusters = self.0.config.load().clusters.clone();
        let upstreams = Upstreams::build(&clusters, true)?;
        self.0.upstreams.store(Arc::new(upstreams));
        if let (Some((store, _)), Some(spec)) = (self.0.tls.get(), self.0.config.load().tls.clone())
        {
            let reloads = self.0.metrics().tls_reloads.clone();
            crate::tls::spawn_reloader(
                store.clone(),
                spec.reload_interval(),
                ctx.stopping(),
                move |r| {
                    let result = if r.is_ok() { "ok" } else { "failed" };
                    reloads.with_label_values(&[result]).inc();
                },
            );
        }
        Ok(())
    }

    async fn serve(&self, conn: Connection) {
        crate::proxy::serve(self.0.clone(), conn).await;
    }

    fn routes(&self) -> Vec<Route> {
        self.0
            .routes()
            .specs()
            .iter()
            .map(RouteSpec::to_contract)
            .collect()
    }

    async fn update_routes(
        &self,
        routes: Vec<Route>,
        replace_all: bool,
    ) -> Result<usize, ModuleError> {
        let _one = self.0.change.lock();
        let mut specs = Vec::with_capacity(routes.len());
        for (i, r) in routes.iter().enumerate() {
            specs.push(
                RouteSpec::from_contract(r)
                    .map_err(|e| ModuleError::Invalid(format!("routes[{i}]: {e}")))?,
            );
        }
        let n = specs.len();
        let mut config = (**self.0.config.load()).clone();
        if replace_all {
            config.routes = specs;
        } else {
            for s in specs {
                match config.routes.iter_mut().find(|r| r.id == s.id) {
                    Some(existing) => *existing = s,
                    None => config.routes.push(s),
                }
            }
        }
        self.0.apply(config).map_err(invalid)?;
        Ok(n)
    }

    async fn delete_route(&self, route_id: &str) -> Result<(), ModuleError> {
        let _one = self.0.change.lock();
        let mut config = (**self.0.config.load()).clone();
        let before = config.routes.len();
        config.routes.retain(|r| r.id != route_id);
        if config.routes.len() == before {
            return Err(ModuleError::NotFound(format!("no route {route_id:?}")));
        }
        self.0.apply(config).map_err(invalid)
    }

    fn config(&self) -> Vec<ConfigSection> {
        let c = self.0.config.load();
        let yaml = |v: Result<String, serde_yaml_ng::Error>| v.unwrap_or_default().into_bytes();
        vec![
            ConfigSection {
                config_type: "routes".into(),
                data: yaml(serde_yaml_ng::to_string(&c.routes)),
            },
            ConfigSection {
                config_type: "clusters".into(),
                data: yaml(serde_yaml_ng::to_string(&c.clusters)),
            },
            ConfigSection {
                config_type: "limits".into(),
                data: yaml(serde_yaml_ng::to_string(&c.limits)),
            },
        ]
    }

    async fn update_config(
        &self,
        config_type: &str,
        data: &[u8],
        validate_only: bool,
    ) -> Result<(), Vec<String>> {
        let _one = self.0.change.lock();
        let text =
            std::str::from_utf8(data).map_err(|_| vec![format!("{config_type}: not UTF-8")])?;
        let mut config = (**self.0.config.load()).clone();
        let parse = |what: &str, e: serde_yaml_ng::Error| vec![format!("{what}: {e}")];
        match config_type {
            "routes" => {
                config.routes = serde_yaml_ng::from_str(text).map_err(|e| parse("routes", e))?
            }
            "clusters" => {
                config.clusters = serde_yaml_ng::from_str(text).map_err(|e| parse("clusters", e))?
            }
            "limits" => {
                config.limits = serde_yaml_ng::from_str(text).map_err(|e| parse("limits", e))?
            }
            other => {
                return Err(vec![format!(
                    "unknown section {other:?} (the ALB has: routes, clusters, limits)"
                )])
            }
        }
        if validate_only {
            return config.validate();
        }
        self.0.apply(config)
    }

    async fn reload(&self, section: serde_yaml_ng::Value) -> Result<String, ModuleError> {
        let _one = self.0.change.lock();
        let config = AlbConfig::from_section(section).map_err(invalid)?;
        let (r, c) = (config.routes.len(), config.clusters.len());
        self.0.apply(config).map_err(invalid)?;
        Ok(format!("{r} route(s), {c} cluster(s) in force"))
    }

    async fn health(&self, _deep: bool) -> Health {
        let mut checks = HashMap::new();
        let mut ok = true;
        for (name, up) in &self.0.upstreams.load().by_name {
            let states = up.cluster.snapshot();
            let usable = states
                .iter()
                .filter(|s| s.healthy && s.ejected_until.is_none())
                .count();
            if usable == 0 {
                ok = false;
            }
            checks.insert(
                format!("cluster.{name}"),
                format!("{usable} of {} endpoint(s) usable", states.len()),
            );
        }
        Health { ok, checks }
    }
}
