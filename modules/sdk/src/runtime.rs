//! Wires a module's parts together and runs them: the listeners, the NLB
//! agent, and shutdown as a small state machine (serving → draining →
//! stopped).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use shared_types::pb::module_service_server::ModuleServiceServer;
use shared_types::pb::{HealthCheckConfig, HealthStatus, ModuleInstance};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::agent::{self, Link, NlbConn};
use crate::auth::ModuleAuth;
use crate::config::SdkConfig;
use crate::context::Context;
use crate::data::{self, Connections, DataSettings};
use crate::module::{Descriptor, Module};
use crate::scale::Scaler;
use crate::service::Service;
use crate::versions::Versions;

/// The longest drain a module waits (what the NLB accepts too).
pub const MAX_DRAIN: Duration = Duration::from_secs(86_400);
/// How long calls still open on the ModuleService and admin ports may take
/// to finish once the drain is over.
pub const SERVER_GRACE: Duration = Duration::from_secs(5);

/// Looks up an environment variable (the process's, or a test's).
pub type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Where the module is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Listening; not yet registered with the NLB.
    Starting,
    /// Registered at least once and taking traffic.
    Serving,
    /// Finishing open connections until the deadline; takes no new ones.
    Draining { deadline: Instant },
    /// Done: listeners closed, about to exit.
    Stopped,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::Draining { .. } => "draining",
            Phase::Stopped => "stopped",
        }
    }

    pub fn health(self) -> HealthStatus {
        match self {
            Phase::Starting => HealthStatus::Starting,
            Phase::Serving => HealthStatus::Healthy,
            Phase::Draining { .. } => HealthStatus::Stopping,
            Phase::Stopped => HealthStatus::Stopped,
        }
    }
}

/// Why the module stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM or SIGINT: unregister gracefully, then drain.
    Signal,
    /// A `Shutdown` call: unregister, then drain (`graceful`) or close now.
    Shutdown { graceful: bool, timeout: Duration },
    /// The NLB said `drain`: it already stopped sending traffic.
    NlbDrain { timeout: Duration },
}

/// Everything the parts of a running module share.
pub struct Shared {
    pub module: Arc<dyn Module>,
    pub descriptor: Descriptor,
    pub ctx: Arc<Context>,
    pub config: SdkConfig,
    pub config_path: Option<PathBuf>,
    pub auth: ModuleAuth,
    pub scaler: Option<Arc<dyn Scaler>>,
    pub conns: Arc<Connections>,
    pub versions: Mutex<Versions>,
    pub link: Mutex<Link>,
    /// Advertised ModuleService address (`ModuleInstance.address`).
    pub grpc_address: String,
    /// Advertised data address (`metadata["data_address"]`).
    pub data_address: String,
    pub started_at: SystemTime,
    phase: watch::Sender<Phase>,
    stop: watch::Sender<Option<StopReason>>,
    /// Routes changed outside a call that announces them itself (a
    /// reload): the agent announces them at its next turn.
    pub reannounce: Notify,
    /// The client of the NLB's control API, once the agent has set it up.
    pub(crate) nlb: std::sync::OnceLock<NlbConn>,
    /// Held across a route change and its announcement (and a reload), so
    /// two changes cannot interleave and leave module and NLB apart.
    pub(crate) routes_lock: tokio::sync::Mutex<()>,
    /// The last `desired_instances` handed to the scaler.
    pub(crate) last_desired: Mutex<Option<i32>>,
    pub(crate) env: Env,
}

impl Shared {
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Follows the phase (for streams that end when the module stops).
    pub fn phase_changes(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub(crate) fn set_phase(&self, p: Phase) {
        self.phase.send_if_modified(|cur| {
            // Never go back from draining or stopped.
            let ok = match (*cur, p) {
                (Phase::Stopped, _) => false,
                (Phase::Draining { .. }, Phase::Starting | Phase::Serving) => false,
                (Phase::Draining { .. }, Phase::Draining { .. }) => false,
                _ => *cur != p,
            };
            if ok {
                *cur = p;
            }
            ok
        });
    }

    /// Asks the module to stop (the first reason wins).
    pub fn request_stop(&self, reason: StopReason) {
        self.stop.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(reason);
                true
            } else {
                false
            }
        });
    }

    pub fn stopping(&self) -> bool {
        self.stop.borrow().is_some()
    }

    /// The instance as the NLB should see it.
    pub fn instance(&self) -> ModuleInstance {
        let mut metadata = HashMap::new();
        metadata.insert("data_address".to_string(), self.data_address.clone());
        metadata.insert("module".to_string(), self.descriptor.name.to_string());
        metadata.insert("admin_address".to_string(), self.admin_address());
        let versions = self.versions.lock();
        let weight = versions.own_weight();
        ModuleInstance {
            instance_id: self.ctx.instance_id.clone(),
            module_type: self.descriptor.module_type as i32,
            address: self.grpc_address.clone(),
            health_status: self.phase().health() as i32,
            metadata,
            started_at: Some(shared_types::time::from_system(self.started_at)),
            current_connections: i32::try_from(self.conns.len()).unwrap_or(i32::MAX),
            max_connections: i32::try_from(self.config.max_connections).unwrap_or(i32::MAX),
            version: self.ctx.version.clone(),
            // 0 means "not set" on the wire: a version at 0 % is reported as
            // unset, which the NLB treats the same when no weights exist.
            traffic_weight: if versions.weights().len() > 1 {
                weight
            } else {
                0
            },
        }
    }

    /// The scaler's backend (`none` without one): the `scaler` capability.
    pub fn scaler_name(&self) -> &str {
        self.scaler.as_ref().map_or("none", |s| s.backend())
    }

    fn admin_address(&self) -> String {
        self.link.lock().admin_address.clone()
    }

    pub fn health_config(&self) -> HealthCheckConfig {
        let h = &self.config.heartbeat;
        HealthCheckConfig {
            interval_seconds: h.interval_seconds as i32,
            timeout_seconds: h.timeout_seconds as i32,
            unhealthy_threshold: h.unhealthy_threshold as i32,
            healthy_threshold: h.healthy_threshold as i32,
            ..HealthCheckConfig::default()
        }
    }

    /// Capabilities announced at registration.
    pub fn capabilities(&self) -> HashMap<String, String> {
        let mut caps = self.descriptor.capabilities.clone();
        if self.config.data.proxy_protocol {
            caps.insert("proxy_protocol".into(), "v2".into());
        }
        caps.insert("scaler".into(), self.scaler_name().to_string());
        caps.insert(
            "protocols".into(),
            self.descriptor
                .protocols
                .iter()
                .map(|p| {
                    p.as_str_name()
                        .trim_start_matches("PROTOCOL_")
                        .to_ascii_lowercase()
                })
                .collect::<Vec<_>>()
                .join(","),
        );
        caps
    }

    /// [`Shared::reload`] on a task of its own: a caller that stops waiting
    /// (a `Reload` deadline) does not cut the reload short halfway.
    pub async fn reload_detached(self: &Arc<Self>) -> Result<String, String> {
        let shared = self.clone();
        tokio::spawn(async move { shared.reload().await })
            .await
            .map_err(|e| format!("the reload failed: {e}"))?
    }

    /// Reads the config file again (for `Reload`): the module section, and
    /// the tokens. All or nothing: if the module refuses its section, the
    /// tokens in force stay too. The SDK's own settings (ports, NLB address)
    /// apply at the next start. Changed routes are announced to the NLB.
    pub async fn reload(&self) -> Result<String, String> {
        let _one_at_a_time = self.routes_lock.lock().await;
        let fresh = match &self.config_path {
            Some(p) => SdkConfig::load(Some(p), &*self.env).map_err(|errs| {
                errs.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            })?,
            None => self.config.clone(),
        };
        let tokens = crate::auth::load_tokens(fresh.auth.tokens_file.as_deref(), &*self.env)
            .map_err(|e| format!("tokens: {e}"))?;
        let routes_before = self.module.routes();
        let said = self
            .module
            .reload(fresh.module.clone())
            .await
            .map_err(|e| e.to_string())?;
        let n = tokens.len();
        self.auth.replace(tokens);
        if self.module.routes() != routes_before {
            if let agent::Announce::Refused(_, why) = agent::announce(self).await {
                let restored = self.module.update_routes(routes_before, true).await;
                return Err(format!(
                    "{said}, but the NLB refused the new routes, so the routes in force stay{}: {why}",
                    if restored.is_ok() { "" } else { " in the NLB (the module could not take its old ones back)" }
                ));
            }
        }
        Ok(format!("{said}; {n} token(s) in force"))
    }
}

/// A module assembled and ready to start.
pub struct Runner {
    module: Arc<dyn Module>,
    config: SdkConfig,
    config_path: Option<PathBuf>,
    scaler: Option<Arc<dyn Scaler>>,
    env: Env,
}

/// A started module.
pub struct Running {
    pub shared: Arc<Shared>,
    pub grpc_addr: SocketAddr,
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    done: JoinHandle<()>,
}

impl Running {
    /// Asks the module to stop.
    pub fn stop(&self, reason: StopReason) {
        self.shared.request_stop(reason);
    }

    /// Waits until the module has stopped; an error if it stopped by a
    /// panic rather than its shutdown sequence.
    pub async fn wait(self) -> Result<(), String> {
        self.done
            .await
            .map_err(|e| format!("the module's run task failed: {e}"))
    }
}

impl Runner {
    pub fn new(module: impl Module, config: SdkConfig) -> Self {
        Runner {
            module: Arc::new(module),
            config,
            config_path: None,
            scaler: None,
            env: Arc::new(|k| std::env::var(k).ok()),
        }
    }

    /// The file `Reload` reads again.
    pub fn config_path(mut self, path: Option<PathBuf>) -> Self {
        self.config_path = path;
        self
    }

    /// What `Scale` calls, instead of the one the `scaling:` config section
    /// chooses (without either, `Scale` is FAILED_PRECONDITION).
    pub fn scaler(mut self, scaler: impl Scaler) -> Self {
        self.scaler = Some(Arc::new(scaler));
        self
    }

    /// Where `MODULE_*` tokens are read from (the process environment by
    /// default).
    pub fn env(mut self, env: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        self.env = Arc::new(env);
        self
    }

    /// Binds the three listeners, then runs everything in the background.
    pub async fn start(self) -> anyhow::Result<Running> {
        use anyhow::Context as _;
        let config = self.config;
        let bind = |what: &'static str, addr: String| async move {
            TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr} ({what})"))
        };
        let grpc = bind("listen.grpc", config.listen.grpc.clone()).await?;
        let data = bind("listen.data", config.listen.data.clone()).await?;
        let admin = bind("listen.admin", config.listen.admin.clone()).await?;
        let (grpc_addr, data_addr, admin_addr) =
            (grpc.local_addr()?, data.local_addr()?, admin.local_addr()?);

        let descriptor = self.module.descriptor();
        let instance_id = if config.instance_id.is_empty() {
            format!(
                "{}-{}-{}",
                descriptor.name,
                crate::config::host_name(),
                data_addr.port()
            )
        } else {
            config.instance_id.clone()
        };
        let version = if config.version.is_empty() {
            descriptor.version.clone()
        } else {
            config.version.clone()
        };
        let scaler = match self.scaler {
            Some(s) => Some(s),
            None => crate::scale::from_config(&config.scaling, &*self.env)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        };
        let auth = ModuleAuth::new(config.auth.tokens_file.as_deref(), &*self.env)
            .map_err(|e| anyhow::anyhow!("auth: {e}"))?;
        if auth.is_open() {
            tracing::warn!(
                "ModuleService is OPEN: no operator or nlb token is configured, so anyone who \
                 reaches {grpc_addr} may reconfigure or shut down this module; set \
                 MODULE_NLB_TOKEN / MODULE_OPERATOR_TOKEN or auth.tokens_file"
            );
        }
        let outward = if config.advertise_host.is_empty() {
            crate::config::outward_host(&config.nlb.addr).await
        } else {
            String::new()
        };
        let ctx = Arc::new(
            Context::new(instance_id, version.clone()).context("registering module metrics")?,
        );
        let (phase, _) = watch::channel(Phase::Starting);
        let (stop, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            module: self.module,
            descriptor,
            ctx,
            grpc_address: config.advertised(grpc_addr, &outward),
            data_address: config.advertised(data_addr, &outward),
            auth,
            scaler,
            conns: Arc::new(Connections::default()),
            versions: Mutex::new(Versions::new(&version)),
            link: Mutex::new(Link::new(config.advertised(admin_addr, &outward))),
            started_at: SystemTime::now(),
            phase,
            stop,
            reannounce: Notify::new(),
            nlb: std::sync::OnceLock::new(),
            routes_lock: tokio::sync::Mutex::new(()),
            last_desired: Mutex::new(None),
            config_path: self.config_path,
            env: self.env,
            config,
        });
        tracing::info!(
            instance = %shared.ctx.instance_id,
            module = shared.descriptor.name,
            version = %shared.ctx.version,
            grpc = %grpc_addr,
            data = %data_addr,
            admin = %admin_addr,
            nlb = %shared.config.nlb.addr,
            scaler = shared.scaler_name(),
            "module starting"
        );
        shared
            .module
            .start(shared.ctx.clone())
            .await
            .map_err(|e| anyhow::anyhow!("module {}: {e}", shared.descriptor.name))?;
        let (stop_accept, accepting) = watch::channel(false);
        let threads = match shared.config.data.threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n as usize,
        };
        let workers = data::spawn_workers(
            data,
            threads,
            shared.module.clone(),
            shared.ctx.clone(),
            shared.conns.clone(),
            DataSettings {
                proxy_protocol: shared.config.data.proxy_protocol,
                proxy_header_timeout: Duration::from_millis(
                    shared.config.data.proxy_header_timeout_ms,
                ),
                max_connections: shared.config.max_connections as usize,
            },
            accepting,
        )
        .context("starting the data threads")?;
        let done = tokio::spawn(run(shared.clone(), grpc, (workers, stop_accept), admin));
        Ok(Running {
            shared,
            grpc_addr,
            data_addr,
            admin_addr,
            done,
        })
    }
}

/// Serves until told to stop, then stops in order. The data threads
/// (`workers`) accept until `stop_accept` turns true and end when they are
/// dropped, after the drain.
async fn run(
    shared: Arc<Shared>,
    grpc: TcpListener,
    (mut workers, stop_accept): (data::Workers, watch::Sender<bool>),
    admin: TcpListener,
) {
    let (stop_servers, servers_stop) = watch::channel(false);

    let service = Service::new(shared.clone());
    let mut grpc_stop = servers_stop.clone();
    let grpc_server = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
        let r = tonic::transport::Server::builder()
            .add_service(ModuleServiceServer::new(service))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "ModuleService server failed");
        }
    });
    let admin_server = tokio::spawn(crate::admin::serve(
        admin,
        shared.clone(),
        servers_stop.clone(),
    ));

    let (agent_stop_tx, agent_stop) = watch::channel(false);
    let agent = tokio::spawn(agent::run(shared.clone(), agent_stop));

    // Wait for a reason to stop.
    let mut stop_rx = shared.stop.subscribe();
    let reason = match stop_rx.wait_for(Option::is_some).await {
        Ok(r) => r.expect("waited for Some"),
        Err(_) => StopReason::Signal,
    };
    let (timeout, graceful) = match reason {
        StopReason::Signal => (
            Duration::from_secs(shared.config.shutdown.drain_timeout_seconds),
            true,
        ),
        StopReason::Shutdown {
            graceful: false, ..
        } => (Duration::ZERO, false),
        StopReason::Shutdown { timeout, .. } | StopReason::NlbDrain { timeout } => (timeout, true),
    };
    let timeout = timeout.min(MAX_DRAIN);
    let deadline = Instant::now() + timeout;
    shared.set_phase(Phase::Draining { deadline });
    shared.ctx.set_stopping();
    tracing::info!(
        ?reason,
        connections = shared.conns.len(),
        drain_seconds = timeout.as_secs(),
        "module stopping"
    );
    // 1. Tell the NLB (unless it told us): it stops sending new connections.
    if !matches!(reason, StopReason::NlbDrain { .. }) {
        agent::unregister(&shared, timeout, graceful).await;
    }
    let _ = agent_stop_tx.send(true);
    // 2. Stop accepting, 3. drain until the deadline.
    let _ = stop_accept.send(true);
    workers.stopped_accepting().await;
    let left = shared.conns.drain(deadline).await;
    drop(workers);
    if left > 0 {
        tracing::warn!(
            closed = left,
            "drain deadline passed: closed the connections still open"
        );
    }
    shared.set_phase(Phase::Stopped);
    let _ = agent.await;
    // Streams end when the module stops; a client that holds a call open
    // anyway does not hold the exit up for long.
    let _ = stop_servers.send(true);
    for (what, server) in [("ModuleService", grpc_server), ("admin", admin_server)] {
        let abort = server.abort_handle();
        if tokio::time::timeout(SERVER_GRACE, server).await.is_err() {
            tracing::warn!(
                server = what,
                "calls still open {SERVER_GRACE:?} after the drain: closed"
            );
            abort.abort();
        }
    }
    tracing::info!("module stopped");
}
