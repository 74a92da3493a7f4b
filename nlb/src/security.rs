//! The NLB's security settings in force: the authenticator and the TLS
//! configs of its ports, loaded at start, reloaded on SIGHUP and when their
//! files change on disk (checked every `reload_interval_seconds`).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};

use crate::app::Nlb;
use crate::auth::{Authenticator, TokenError};
use crate::config::{NlbConfig, TlsFiles};
use crate::metrics::NlbMetrics;
use crate::tls::{ReloadingTls, TlsError};

/// ALPN of the gRPC port.
pub const GRPC_ALPN: &[&[u8]] = &[b"h2"];
/// ALPN of the admin port (HTTP/1.1 only).
pub const ADMIN_ALPN: &[&[u8]] = &[b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("tokens: {0}")]
    Tokens(#[from] TokenError),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("module call token: {0}")]
    CallToken(String),
}

/// The `authorization` value the NLB sends when it calls a module's
/// ModuleService (modules accept it as their `nlb` token).
pub type CallToken = Arc<ArcSwapOption<MetadataValue<Ascii>>>;

/// The variable holding the token the NLB presents to modules.
pub const ENV_MODULE_CALL_TOKEN: &str = "NLB_MODULE_CALL_TOKEN";

/// Authentication and TLS in force.
pub struct Security {
    pub auth: Authenticator,
    pub grpc_tls: OnceLock<Arc<ReloadingTls>>,
    pub admin_tls: OnceLock<Arc<ReloadingTls>>,
    /// What the NLB presents to modules (shared with its module clients).
    pub module_call_token: CallToken,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            auth: Authenticator::open(),
            grpc_tls: OnceLock::new(),
            admin_tls: OnceLock::new(),
            module_call_token: CallToken::default(),
        }
    }
}

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Reads the module call token: `NLB_MODULE_CALL_TOKEN`, else
/// `auth.module_call_token_file`; `None` when neither is set.
pub fn load_call_token(
    config: &NlbConfig,
    env: Env<'_>,
) -> Result<Option<MetadataValue<Ascii>>, SecurityError> {
    let bad = |m: String| SecurityError::CallToken(m);
    let token = match env(ENV_MODULE_CALL_TOKEN).filter(|t| !t.trim().is_empty()) {
        Some(t) => t.trim().to_string(),
        None => match &config.auth.module_call_token_file {
            None => return Ok(None),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| bad(format!("cannot read {}: {e}", p.display())))?;
                let t = text.trim().to_string();
                if t.is_empty() {
                    return Err(bad(format!("{} is empty", p.display())));
                }
                t
            }
        },
    };
    if token.len() < crate::auth::tokens::MIN_TOKEN_LEN {
        return Err(bad(format!(
            "a token needs at least {} characters",
            crate::auth::tokens::MIN_TOKEN_LEN
        )));
    }
    format!("Bearer {token}")
        .parse()
        .map(Some)
        .map_err(|_| bad("it holds characters an HTTP header cannot carry".into()))
}

impl Security {
    /// Loads tokens and TLS files at start; any problem stops the start.
    pub fn init(
        &self,
        config: &NlbConfig,
        env: Env<'_>,
        metrics: &NlbMetrics,
    ) -> Result<(), SecurityError> {
        let n = self.auth.reload(config.auth.tokens_file.as_deref(), env)?;
        metrics.auth_enabled.set(i64::from(self.auth.enabled()));
        let call = load_call_token(config, env)?;
        if call.is_none() {
            tracing::info!("no module call token (NLB_MODULE_CALL_TOKEN, auth.module_call_token_file): calls to modules carry no token, so modules with tokens refuse the NLB's Scale and SetTrafficWeight");
        }
        self.module_call_token.store(call.map(Arc::new));
        if self.auth.enabled() {
            tracing::info!(tokens = n, "control API authentication is on");
            if n == 0 {
                tracing::warn!("the tokens file lists no tokens: every control API call but health checks will be refused");
            }
        } else {
            tracing::warn!(
                "CONTROL API AUTHENTICATION IS OFF: no tokens are configured (auth.tokens_file, NLB_TOKENS_FILE, NLB_OPERATOR_TOKEN, NLB_VIEWER_TOKEN, NLB_MODULE_TOKEN). Anyone who can reach the gRPC port can change routing; see docs/security.md"
            );
        }
        for (port, files, slot, alpn) in [
            ("grpc", &config.tls.grpc, &self.grpc_tls, GRPC_ALPN),
            ("admin", &config.tls.admin, &self.admin_tls, ADMIN_ALPN),
        ] {
            if let Some(files) = files {
                let tls = ReloadingTls::new(port, files, alpn)?;
                tracing::info!(
                    port,
                    cert = %files.cert_file.display(),
                    mutual = files.client_ca_file.is_some(),
                    "TLS on"
                );
                let _ = slot.set(Arc::new(tls));
            }
        }
        Ok(())
    }

    /// Re-reads the tokens file and the TLS files: all of them when
    /// `force` (SIGHUP), else only those that changed on disk. A file that
    /// fails to load leaves what is in force, says why and counts it.
    pub fn reload(&self, config: &NlbConfig, env: Env<'_>, metrics: &NlbMetrics, force: bool) {
        if force || self.auth.file_changed() {
            match self.auth.reload(config.auth.tokens_file.as_deref(), env) {
                Ok(n) => {
                    metrics.auth_reloads.with_label_values(&["ok"]).inc();
                    tracing::info!(tokens = n, "tokens reloaded");
                }
                Err(e) => {
                    metrics.auth_reloads.with_label_values(&["failed"]).inc();
                    tracing::error!(error = %e, "tokens reload refused; the tokens in force stay");
                }
            }
            metrics.auth_enabled.set(i64::from(self.auth.enabled()));
            match load_call_token(config, env) {
                Ok(t) => self.module_call_token.store(t.map(Arc::new)),
                Err(e) => {
                    tracing::error!(error = %e, "module call token reload refused; the token in force stays")
                }
            }
        }
        for (port, files, slot) in [
            ("grpc", &config.tls.grpc, &self.grpc_tls),
            ("admin", &config.tls.admin, &self.admin_tls),
        ] {
            reload_port(port, files.as_ref(), slot.get(), metrics, force);
        }
    }
}

fn reload_port(
    port: &'static str,
    files: Option<&TlsFiles>,
    tls: Option<&Arc<ReloadingTls>>,
    metrics: &NlbMetrics,
    force: bool,
) {
    match (files, tls) {
        (Some(files), Some(tls)) => {
            if !force && !tls.files_changed() {
                return;
            }
            match tls.reload(files) {
                Ok(()) => {
                    metrics.tls_reloads.with_label_values(&[port, "ok"]).inc();
                    tracing::info!(port, cert = %files.cert_file.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    metrics
                        .tls_reloads
                        .with_label_values(&[port, "failed"])
                        .inc();
                    tracing::error!(error = %e, "TLS reload refused; the certificate in force stays");
                }
            }
        }
        (Some(_), None) if force => {
            tracing::warn!(
                port,
                "TLS was turned on in the config; it takes effect after a restart"
            )
        }
        (None, Some(_)) if force => tracing::warn!(
            port,
            "TLS was turned off in the config; the port stays TLS until a restart"
        ),
        _ => {}
    }
}

/// Loads everything `config` names (tokens, certificates, keys) without
/// serving, for `--check-config`.
pub fn check_files(config: &NlbConfig, env: Env<'_>) -> Result<(), SecurityError> {
    Authenticator::load(config.auth.tokens_file.as_deref(), env)?;
    load_call_token(config, env)?;
    for (port, files, alpn) in [
        ("grpc", &config.tls.grpc, GRPC_ALPN),
        ("admin", &config.tls.admin, ADMIN_ALPN),
    ] {
        if let Some(files) = files {
            crate::tls::server_config(port, files, alpn)?;
        }
    }
    Ok(())
}

/// Checks the tokens and TLS files for changes every second, reloading each
/// at most once per its `reload_interval_seconds` (0 = never; SIGHUP still
/// reloads).
pub fn spawn_watcher(nlb: Arc<Nlb>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_auth = Instant::now();
        let mut last_tls = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let config = nlb.config.current();
            let due = |last: &mut Instant, secs: u64| {
                let due = secs > 0 && last.elapsed() >= Duration::from_secs(secs);
                if due {
                    *last = Instant::now();
                }
                due
            };
            let auth_due = due(&mut last_auth, config.auth.reload_interval_seconds)
                && nlb.security.auth.file_changed();
            if auth_due {
                nlb.reload_security(false);
            }
            if due(&mut last_tls, config.tls.reload_interval_seconds) {
                let s = &nlb.security;
                let changed = s.grpc_tls.get().is_some_and(|t| t.files_changed())
                    || s.admin_tls.get().is_some_and(|t| t.files_changed());
                if changed {
                    nlb.reload_security(false);
                }
            }
        }
    })
}
