//! Starting and stopping the NLB: the gRPC control API (with grpc.health.v1,
//! server reflection, `x-request-id`, message limits and keepalive), the admin
//! HTTP port, and the background loops (leases, health checks, sampling).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shared_types::pb::nlb_service_server::NlbServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admission::{Admission, AdmittedListener};
use crate::app::Nlb;
use crate::auth::layer::AuthLayer;
use crate::control::ControlService;
use crate::metrics::grpc::GrpcMetricsLayer;
use crate::request_id::RequestIdLayer;
use crate::{admin, admission, liveness, security};

/// Why the NLB could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("{0}")]
    Security(#[from] crate::security::SecurityError),
    #[error("{0}")]
    Listener(#[from] crate::dataplane::BindError),
    /// The rollouts file beside the state file cannot be read.
    #[error("{0}")]
    Rollouts(String),
}

/// A running NLB.
pub struct Running {
    pub nlb: Arc<Nlb>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    health: tonic_health::server::HealthReporter,
    servers: Vec<JoinHandle<()>>,
    loops: Vec<JoinHandle<()>>,
}

async fn bind(what: &'static str, addr: &str) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind {
        what,
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}

/// Binds the ports and starts serving.
pub async fn start(nlb: Arc<Nlb>) -> Result<Running, StartError> {
    if let Some(e) = &nlb.rollouts_error {
        return Err(StartError::Rollouts(e.clone()));
    }
    let config = nlb.config.current();
    nlb.security
        .init(&config, &|v| nlb.config.env_var(v), &nlb.metrics)?;
    let (grpc_listener, grpc_addr) = bind("gRPC", &config.grpc.listen).await?;
    let (admin_listener, admin_addr) = bind("admin", &config.admin.listen).await?;
    let _ = nlb.bound.set((grpc_addr, admin_addr));
    let (stop, stopped) = watch::channel(false);

    let (health, health_service) = tonic_health::server::health_reporter();
    // Both reflection versions: grpcurl speaks v1, many clients v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(shared_types::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    let max = config.grpc.max_message_bytes;
    let control = NlbServiceServer::new(ControlService::new(Arc::clone(&nlb)))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let keepalive = (config.grpc.keepalive_interval_seconds > 0)
        .then(|| Duration::from_secs(config.grpc.keepalive_interval_seconds));
    // Outermost first: the request id (and, with debug logs, the call's
    // span), metrics (so refused calls are counted too), then authentication.
    let layers = tower::ServiceBuilder::new()
        .layer(RequestIdLayer)
        .layer(GrpcMetricsLayer::new(Arc::clone(&nlb.metrics.grpc)))
        .layer(AuthLayer::new(
            Arc::clone(&nlb.security),
            nlb.metrics.auth_refusals.clone(),
            nlb.metrics.audit_events.clone(),
        ));
    let mut grpc_stop = stopped.clone();
    let handshake = Duration::from_secs(config.grpc.handshake_timeout_seconds);
    let incoming = admission::incoming(
        grpc_listener,
        Admission {
            port: "gRPC",
            require_h2_preface: true,
            tls: nlb.security.grpc_tls.get().cloned(),
            deadline: handshake,
        },
        stopped.clone(),
    );
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(Duration::from_secs(
            config.grpc.keepalive_timeout_seconds,
        )))
        .max_concurrent_streams(config.grpc.max_concurrent_streams)
        .tcp_nodelay(true)
        .layer(layers)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(control)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = grpc_stop.wait_for(|s| *s).await;
        });
    let grpc_task = tokio::spawn(async move {
        if let Err(e) = grpc.await {
            tracing::error!(error = %e, "gRPC server stopped with an error");
        }
    });
    let admin_conns = admission::incoming(
        admin_listener,
        Admission {
            port: "admin",
            require_h2_preface: false,
            tls: nlb.security.admin_tls.get().cloned(),
            deadline: handshake,
        },
        stopped.clone(),
    );
    let admin_task = tokio::spawn(admin::serve(
        Arc::clone(&nlb),
        AdmittedListener::new(admin_conns, admin_addr),
        stopped.clone(),
    ));

    let mut loops = liveness::spawn_loops(Arc::clone(&nlb), stopped.clone());
    loops.push(crate::rollout::controller::spawn(
        Arc::clone(&nlb),
        stopped.clone(),
    ));
    loops.push(crate::scaling::spawn(Arc::clone(&nlb), stopped.clone()));
    loops.push(security::spawn_watcher(Arc::clone(&nlb), stopped));
    health
        .set_serving::<NlbServiceServer<ControlService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    // The data plane last: connections arrive once the control API can
    // take the modules' registrations.
    // The config as it is now: an update may have come in since `config`.
    nlb.dataplane_started.store(true, Ordering::Relaxed);
    let now = nlb.config.current();
    let mut failed = nlb.dataplane.apply(&now.listeners, &now.dataplane);
    if !failed.is_empty() {
        let _ = stop.send(true);
        nlb.dataplane.shutdown(Duration::ZERO).await;
        return Err(StartError::Listener(failed.remove(0)));
    }
    nlb.ready.store(true, Ordering::Relaxed);
    tracing::info!(%grpc_addr, %admin_addr, listeners = config.listeners.len(), "NLB serving");
    Ok(Running {
        nlb,
        grpc_addr,
        admin_addr,
        stop,
        health,
        servers: vec![grpc_task, admin_task],
        loops,
    })
}

impl Running {
    /// Stops: not ready and NOT_SERVING at once, then servers finish the calls
    /// in flight until `grace`, then everything stops.
    pub async fn shutdown(self, grace: Duration) {
        self.nlb.begin_shutdown();
        self.health
            .set_not_serving::<NlbServiceServer<ControlService>>()
            .await;
        self.health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        // Listeners stop accepting at once; their connections finish until
        // the data plane's drain deadline while the control API winds down.
        let drain = Duration::from_secs(self.nlb.dataplane.settings().drain_timeout_seconds);
        let dataplane = Arc::clone(&self.nlb.dataplane);
        let drained = async move {
            let cut = dataplane.shutdown(drain).await;
            if cut > 0 {
                tracing::warn!(
                    cut,
                    "connections still open at the drain deadline were closed"
                );
            }
        };
        let _ = self.stop.send(true);
        for l in &self.loops {
            l.abort();
        }
        let servers = async {
            let servers = futures::future::join_all(self.servers);
            if tokio::time::timeout(grace, servers).await.is_err() {
                tracing::warn!(
                    grace_ms = grace.as_millis() as u64,
                    "calls still in flight at the shutdown deadline were cut"
                );
            }
        };
        tokio::join!(drained, servers);
        tracing::info!("NLB stopped");
    }
}
