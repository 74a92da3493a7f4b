//! Where and how nlbctl talks to the NLB: the address, TLS (and mutual TLS),
//! the bearer token sent on every call, and the per-call deadline.
//!
//! Everything here is checked before the first byte goes out, so a wrong flag
//! or an unusable credential file is a usage error (exit 2), never a
//! confusing connect failure.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use shared_types::pb::nlb_service_client::NlbServiceClient;
use tokio::sync::OnceCell;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Response, Status};

use super::cli::Global;
use super::exit::{error_chain, CtlError};

/// The gRPC client nlbctl uses: `NLBService` with the token interceptor.
pub type Client = NlbServiceClient<InterceptedService<Channel, Auth>>;

/// Adds `authorization: Bearer <token>` to every call. Its `Debug` never
/// shows the token.
#[derive(Clone, Default)]
pub struct Auth {
    header: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("token", &self.header.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Auth {
    /// Builds the header value for `token`; `from` names where the token came
    /// from, for the error (which never includes the token itself).
    pub fn bearer(token: &str, from: &str) -> Result<Self, CtlError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(CtlError::Usage(format!("the token from {from} is empty")));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
            CtlError::Usage(format!(
                "the token from {from} has characters an HTTP header cannot carry \
                     (only visible ASCII)"
            ))
        })?;
        // Never indexed by HPACK, and shown as "Sensitive" by Debug.
        value.set_sensitive(true);
        Ok(Auth {
            header: Some(value),
        })
    }

    pub fn is_set(&self) -> bool {
        self.header.is_some()
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// Connection settings, resolved from the flags and the environment.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The address as the user gave it (for messages).
    pub addr: String,
    pub endpoint: Endpoint,
    pub auth: Auth,
    pub tls: bool,
    /// Whether a client certificate is presented (mutual TLS).
    pub client_cert: bool,
    /// Deadline of each unary call and of connecting.
    pub timeout: Option<Duration>,
}

/// The endpoint URI for `addr`: `host:port` gets `http://` (or `https://`
/// with TLS); an explicit scheme must agree with whether TLS is configured.
pub fn endpoint_uri(addr: &str, tls: bool) -> Result<String, String> {
    let given = addr.trim();
    let (scheme, rest) = if let Some(r) = given.strip_prefix("http://") {
        (Some("http"), r)
    } else if let Some(r) = given.strip_prefix("https://") {
        (Some("https"), r)
    } else if given.contains("://") {
        return Err(format!(
            "--addr {given:?}: only http:// and https:// addresses are supported"
        ));
    } else {
        (None, given)
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let parsed: http::uri::Authority = authority.parse().map_err(|_| {
        format!("--addr {given:?} is not host:port, http://host:port or https://host:port")
    })?;
    if authority.contains('/') || authority.contains('@') || parsed.port_u16().is_none() {
        return Err(format!(
            "--addr {given:?} must be host:port (with a port), http://host:port or https://host:port"
        ));
    }
    match (scheme, tls) {
        (Some("https"), false) => Err(format!(
            "--addr {given:?} asks for TLS: give --ca-cert (the CA that signed the NLB's \
             certificate; nlbctl does not read a system trust store)"
        )),
        (Some("http"), true) => Err(format!(
            "--addr {given:?} asks for plain text, but --ca-cert asks for TLS: \
             use https:// or host:port"
        )),
        _ => Ok(format!(
            "{}://{authority}",
            if tls { "https" } else { "http" }
        )),
    }
}

fn read_credential(path: &Path, flag: &str) -> Result<Vec<u8>, CtlError> {
    std::fs::read(path)
        .map_err(|e| CtlError::Usage(format!("{flag} {}: cannot read it: {e}", path.display())))
}

fn require_pem(data: &[u8], path: &Path, flag: &str, what: &str) -> Result<(), CtlError> {
    let text = String::from_utf8_lossy(data);
    if text.contains("-----BEGIN ") && text.contains(what) {
        Ok(())
    } else {
        Err(CtlError::Usage(format!(
            "{flag} {}: no PEM {what} in it",
            path.display()
        )))
    }
}

/// The token: a flag wins over the environment; `--token` and `--token-file`
/// (or their two variables) together are a usage error.
fn resolve_token(g: &Global, env: &dyn Fn(&str) -> Option<String>) -> Result<Auth, CtlError> {
    let from_file = |path: &Path, from: &str| -> Result<Auth, CtlError> {
        let data = std::fs::read_to_string(path).map_err(|e| {
            CtlError::Usage(format!(
                "{from} {}: cannot read the token: {e}",
                path.display()
            ))
        })?;
        Auth::bearer(&data, &format!("{from} {}", path.display()))
    };
    if let Some(t) = &g.token {
        return Auth::bearer(t, "--token");
    }
    if let Some(p) = &g.token_file {
        return from_file(p, "--token-file");
    }
    let env_token = env("NLBCTL_TOKEN").filter(|v| !v.is_empty());
    let env_file = env("NLBCTL_TOKEN_FILE").filter(|v| !v.is_empty());
    match (env_token, env_file) {
        (Some(_), Some(_)) => Err(CtlError::Usage(
            "NLBCTL_TOKEN and NLBCTL_TOKEN_FILE are both set: keep one".into(),
        )),
        (Some(t), None) => Auth::bearer(&t, "NLBCTL_TOKEN"),
        (None, Some(p)) => from_file(Path::new(&p), "NLBCTL_TOKEN_FILE"),
        (None, None) => Ok(Auth::default()),
    }
}

fn resolve_tls(g: &Global) -> Result<Option<ClientTlsConfig>, CtlError> {
    let Some(ca_path) = &g.ca_cert else {
        let stray = [
            (g.cert.is_some(), "--cert"),
            (g.key.is_some(), "--key"),
            (g.tls_server_name.is_some(), "--tls-server-name"),
        ];
        if let Some((_, flag)) = stray.iter().find(|(set, _)| *set) {
            return Err(CtlError::Usage(format!(
                "{flag} needs TLS: give --ca-cert (the CA that signed the NLB's certificate)"
            )));
        }
        return Ok(None);
    };
    let ca = read_credential(ca_path, "--ca-cert")?;
    require_pem(&ca, ca_path, "--ca-cert", "CERTIFICATE")?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    match (&g.cert, &g.key) {
        (Some(cert_path), Some(key_path)) => {
            let cert = read_credential(cert_path, "--cert")?;
            require_pem(&cert, cert_path, "--cert", "CERTIFICATE")?;
            let key = read_credential(key_path, "--key")?;
            require_pem(&key, key_path, "--key", "PRIVATE KEY")?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        (None, None) => {}
        _ => {
            return Err(CtlError::Usage(
                "--cert and --key go together (the client certificate and its key)".into(),
            ))
        }
    }
    if let Some(name) = &g.tls_server_name {
        tls = tls.domain_name(name.clone());
    }
    if let Some(t) = g.timeout.0 {
        tls = tls.timeout(t);
    }
    Ok(Some(tls))
}

impl ClientOptions {
    /// Resolves the global flags (and `NLBCTL_TOKEN*` from `env`).
    pub fn resolve(g: &Global, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, CtlError> {
        let tls = resolve_tls(g)?;
        let uri = endpoint_uri(&g.addr, tls.is_some()).map_err(CtlError::Usage)?;
        let auth = resolve_token(g, env)?;
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| CtlError::Usage(format!("--addr {:?}: {e}", g.addr)))?
            .user_agent(concat!("nlbctl/", env!("CARGO_PKG_VERSION")))
            .map_err(|e| CtlError::Other(format!("user agent: {e}")))?
            .tcp_nodelay(true);
        if let Some(t) = g.timeout.0 {
            endpoint = endpoint.connect_timeout(t);
        }
        let has_tls = tls.is_some();
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).map_err(|e| {
                CtlError::Usage(format!(
                    "TLS settings (--ca-cert, --cert, --key): {}",
                    error_chain(&e)
                ))
            })?;
        }
        Ok(ClientOptions {
            addr: g.addr.trim().to_string(),
            endpoint,
            auth,
            tls: has_tls,
            client_cert: g.cert.is_some(),
            timeout: g.timeout.0,
        })
    }
}

/// A connection to the NLB, opened on first use (so commands that fail on
/// their input never connect).
pub struct Ctl {
    opts: ClientOptions,
    client: OnceCell<Client>,
}

impl Ctl {
    pub fn new(opts: ClientOptions) -> Self {
        Ctl {
            opts,
            client: OnceCell::new(),
        }
    }

    /// The client, connecting first if needed.
    pub async fn client(&self) -> Result<Client, CtlError> {
        self.client
            .get_or_try_init(|| async {
                let connect = self.opts.endpoint.connect();
                let channel =
                    match self.opts.timeout {
                        Some(t) => tokio::time::timeout(t, connect).await.map_err(|_| {
                            CtlError::Connect {
                                addr: self.opts.addr.clone(),
                                detail: format!("no connection within {}", seconds(t)),
                            }
                        })?,
                        None => connect.await,
                    }
                    .map_err(|e| CtlError::Connect {
                        addr: self.opts.addr.clone(),
                        detail: error_chain(&e),
                    })?;
                Ok(NlbServiceClient::with_interceptor(
                    channel,
                    self.opts.auth.clone(),
                ))
            })
            .await
            .cloned()
    }

    /// One unary call with the per-call deadline (sent to the NLB as
    /// `grpc-timeout`, and enforced here). `what` names the call in errors.
    pub async fn call<Req, Resp, F, Fut>(
        &self,
        what: &str,
        message: Req,
        f: F,
    ) -> Result<Resp, CtlError>
    where
        F: FnOnce(Client, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let client = self.client().await?;
        let mut req = Request::new(message);
        if let Some(t) = self.opts.timeout {
            req.set_timeout(t);
        }
        let answer = match self.opts.timeout {
            Some(t) => tokio::time::timeout(t, f(client, req))
                .await
                .unwrap_or_else(|_| {
                    Err(Status::deadline_exceeded(format!(
                        "no answer within {} (--timeout)",
                        seconds(t)
                    )))
                }),
            None => f(client, req).await,
        };
        answer
            .map(Response::into_inner)
            .map_err(|s| self.failed(what, s))
    }

    /// The error for a failed call. A status made on this side because the
    /// connection failed (tonic gives it the transport error as its source,
    /// or, for HTTP/2 errors, a message starting `h2 protocol error`;
    /// statuses the NLB sends have neither) is a connection failure, exit 3,
    /// with a hint about TLS. With TLS 1.3 that is how a server refusing the
    /// client certificate shows (the handshake completes, then the first call
    /// fails), and plain text sent to a TLS port breaks the same way.
    pub fn failed(&self, what: &str, status: Status) -> CtlError {
        use tonic::Code;
        let local = matches!(
            status.code(),
            Code::Unknown | Code::Cancelled | Code::Unavailable | Code::Internal
        ) && (std::error::Error::source(&status).is_some()
            || status.message().starts_with("h2 protocol error"));
        if !local {
            return CtlError::status(what, status);
        }
        let mut detail = match std::error::Error::source(&status) {
            Some(cause) if !status.message().starts_with("h2 protocol error") => error_chain(cause),
            _ => status.message().to_string(),
        };
        if !self.opts.tls {
            detail.push_str(" (if the NLB serves TLS, give --ca-cert)");
        } else if !self.opts.client_cert {
            detail.push_str(" (if the NLB requires client certificates, give --cert and --key)");
        }
        CtlError::Connect {
            addr: self.opts.addr.clone(),
            detail,
        }
    }
}

fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::cli::Cli;
    use crate::ctl::exit::Exit;
    use clap::Parser;

    fn global(args: &[&str]) -> Global {
        let mut all = vec!["nlbctl"];
        all.extend_from_slice(args);
        all.push("status");
        Cli::try_parse_from(all).expect("valid flags").global
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn addresses_take_three_forms() {
        assert_eq!(
            endpoint_uri("127.0.0.1:50051", false).unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            endpoint_uri("nlb.local:443", true).unwrap(),
            "https://nlb.local:443"
        );
        assert_eq!(
            endpoint_uri("http://[::1]:50051/", false).unwrap(),
            "http://[::1]:50051"
        );
        assert_eq!(
            endpoint_uri("https://nlb:1", true).unwrap(),
            "https://nlb:1"
        );
        let e = endpoint_uri("https://nlb:1", false).unwrap_err();
        assert!(e.contains("--ca-cert"), "{e}");
        assert!(endpoint_uri("http://nlb:1", true).is_err());
        assert!(endpoint_uri("nlb", false).is_err(), "a port is needed");
        assert!(endpoint_uri("unix:///tmp/s", false).is_err());
        assert!(endpoint_uri("http://nlb:1/path", false).is_err());
    }

    #[test]
    fn the_token_comes_from_a_flag_before_the_environment() {
        let env = |k: &str| (k == "NLBCTL_TOKEN").then(|| "from-env".to_string());
        let auth = resolve_token(&global(&["--token", "from-flag"]), &env).unwrap();
        let mut req = Request::new(());
        req = auth.clone().call(req).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer from-flag"
        );
        let auth = resolve_token(&global(&[]), &env).unwrap();
        let req = auth.clone().call(Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer from-env"
        );
        assert!(!resolve_token(&global(&[]), &no_env).unwrap().is_set());
        let both = |k: &str| Some(format!("{k}-value"));
        assert!(matches!(
            resolve_token(&global(&[]), &both),
            Err(CtlError::Usage(_))
        ));
    }

    #[test]
    fn token_errors_never_show_the_token() {
        let e = Auth::bearer("sec\u{7}ret", "--token")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("sec"), "{e}");
        assert!(format!("{:?}", Auth::bearer("secret", "x").unwrap()).contains("redacted"));
        assert!(!format!("{:?}", Auth::bearer("secret", "x").unwrap()).contains("secret"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  file-token\n").unwrap();
        let g = global(&["--token-file", path.to_str().unwrap()]);
        let req = resolve_token(&g, &no_env)
            .unwrap()
            .call(Request::new(()))
            .unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer file-token"
        );
        std::fs::write(&path, "\n").unwrap();
        let e = resolve_token(&g, &no_env).unwrap_err().to_string();
        assert!(e.contains("is empty") && e.contains("--token-file"), "{e}");
    }

    #[test]
    fn broken_connections_are_told_from_statuses_the_nlb_sent() {
        let ctl = Ctl::new(ClientOptions::resolve(&global(&[]), &no_env).unwrap());
        let e = ctl.failed(
            "status",
            Status::internal("h2 protocol error: frame with invalid size"),
        );
        assert!(matches!(e, CtlError::Connect { .. }), "{e:?}");
        assert_eq!(e.exit(), Exit::Unreachable);
        assert!(e.to_string().contains("give --ca-cert"), "{e}");
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let e = ctl.failed("status", Status::from_error(Box::new(io)));
        assert!(e.to_string().contains("reset by peer"), "{e}");
        assert_eq!(e.exit(), Exit::Unreachable);
        // What the NLB says stays as it said it.
        let e = ctl.failed("status", Status::internal("state file broke"));
        assert_eq!(e.to_string(), "status: INTERNAL: state file broke");
        assert_eq!(e.exit(), Exit::Failure);
        assert_eq!(
            ctl.failed("x", Status::not_found("no")).exit(),
            Exit::NotFound
        );
    }

    #[test]
    fn tls_flags_are_checked_before_connecting() {
        let e = ClientOptions::resolve(&global(&["--cert", "c.pem", "--key", "k.pem"]), &no_env)
            .unwrap_err();
        assert!(e.to_string().contains("--ca-cert"), "{e}");
        let e = ClientOptions::resolve(&global(&["--ca-cert", "/nonexistent/ca.pem"]), &no_env)
            .unwrap_err();
        assert!(matches!(e, CtlError::Usage(_)));
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let e = ClientOptions::resolve(&global(&["--ca-cert", ca.to_str().unwrap()]), &no_env)
            .unwrap_err();
        assert!(e.to_string().contains("no PEM CERTIFICATE"), "{e}");
    }
}
