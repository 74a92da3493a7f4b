//! Control API security over real sockets: token auth with DESIGN.md's role
//! table, module tokens bound to the instances they registered, tokens
//! reloaded without a restart, the audit trail and gRPC metrics, and TLS and
//! mutual TLS on the gRPC and admin ports with certificates replaced live.

#[allow(dead_code)]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use shared_types::pb::{self, nlb_service_client::NlbServiceClient, ModuleType, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

const OPERATOR: &str = "operator-secret-0123456789";
const VIEWER: &str = "viewer-secret-0123456789";
const MODULE: &str = "module-secret-0123456789";

fn env_tokens() -> [(&'static str, &'static str); 3] {
    [
        ("NLB_OPERATOR_TOKEN", OPERATOR),
        ("NLB_VIEWER_TOKEN", VIEWER),
        ("NLB_MODULE_TOKEN", MODULE),
    ]
}

fn code_of<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    let s = r.expect_err("the call should be refused");
    (s.code(), s.message().to_string())
}

fn list() -> pb::ListModulesRequest {
    pb::ListModulesRequest::default()
}

fn dry_run(dry: bool) -> pb::RouteRequestRequest {
    pb::RouteRequestRequest {
        route: Some(route("", Protocol::Tcp, 80)),
        context: Default::default(),
        dry_run: dry,
    }
}

fn update_routes() -> pb::UpdateRoutingRequest {
    pb::UpdateRoutingRequest {
        routes: vec![type_route("web", Protocol::Http, 80, "alb")],
        ..Default::default()
    }
}

#[tokio::test]
async fn every_call_needs_a_token_with_the_right_role() {
    let t = TestNlb::start_with_env("", &env_tokens()).await;
    let mut c = t.client.clone();

    let (code, msg) = code_of(c.list_modules(list()).await);
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("ListModules needs a token"), "{msg}");
    assert!(msg.contains("authorization: Bearer"), "{msg}");
    let (code, msg) = code_of(
        c.list_modules(bearer(list(), "no-such-token-0123456"))
            .await,
    );
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("not valid"), "{msg}");

    // viewer: reads, dry runs; no changes.
    assert!(c.list_modules(bearer(list(), VIEWER)).await.is_ok());
    assert!(c.route_request(bearer(dry_run(true), VIEWER)).await.is_ok());
    let (code, msg) = code_of(c.route_request(bearer(dry_run(false), VIEWER)).await);
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("unless dry_run"), "{msg}");
    let (code, msg) = code_of(c.update_routing(bearer(update_routes(), VIEWER)).await);
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("unless validate_only is set"), "{msg}");
    // Validating is a read: a viewer may check routes before asking for them.
    let check = pb::UpdateRoutingRequest {
        validate_only: true,
        ..update_routes()
    };
    let checked = c
        .update_routing(bearer(check, VIEWER))
        .await
        .unwrap()
        .into_inner();
    assert!(checked.success, "{}", checked.message);
    assert!(
        msg.contains("role viewer") && msg.contains("UpdateRouting needs an operator token"),
        "{msg}"
    );

    // module: registration and its own heartbeats; no reads.
    let reg = register_req(
        instance("alb-1", ModuleType::Alb, "127.0.0.1:7001", None),
        vec![],
    );
    let id = c
        .register_module(bearer(reg, MODULE))
        .await
        .expect("a module token registers")
        .into_inner()
        .registration_id;
    let hb = pb::HeartbeatRequest {
        instance_id: "alb-1".into(),
        registration_id: id,
        ..Default::default()
    };
    assert!(
        c.heartbeat(bearer(hb, MODULE))
            .await
            .unwrap()
            .into_inner()
            .acknowledged
    );
    let (code, msg) = code_of(c.list_modules(bearer(list(), MODULE)).await);
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("role module"), "{msg}");

    // operator, as x-api-key: everything.
    let resp = c
        .update_routing(with_header(update_routes(), "x-api-key", OPERATOR))
        .await
        .expect("an operator changes routes")
        .into_inner();
    assert!(resp.success, "{}", resp.message);
    let listed = c
        .list_modules(with_header(list(), "x-api-key", OPERATOR))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total_modules, 1);

    // Health checks need no token: probes carry no secrets.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(t.grpc_addr).await);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health is open")
        .into_inner();
    assert_eq!(h.status, 1); // SERVING

    let m = scrape(t.admin_addr).await;
    assert_eq!(sample(&m, "nlb_auth_enabled"), 1.0);
    assert_eq!(
        sample(&m, "nlb_auth_refusals_total{reason=\"missing_token\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "nlb_auth_refusals_total{reason=\"invalid_token\"}"),
        1.0
    );
    // ListModules as module. (The viewer's real UpdateRouting and
    // RouteRequest are refused by their handlers, which see the dry-run flag.)
    assert_eq!(
        sample(&m, "nlb_auth_refusals_total{reason=\"permission_denied\"}"),
        1.0
    );
    let svc = "service=\"marchproxy.NLBService\"";
    assert_eq!(
        sample(
            &m,
            &format!(
                "nlb_grpc_requests_total{{code=\"UNAUTHENTICATED\",method=\"ListModules\",{svc}}}"
            )
        ),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            &format!("nlb_grpc_requests_total{{code=\"OK\",method=\"ListModules\",{svc}}}")
        ),
        2.0
    );
    assert_eq!(
        sample(&m, &format!("nlb_grpc_requests_total{{code=\"PERMISSION_DENIED\",method=\"RouteRequest\",{svc}}}")),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            &format!("nlb_grpc_request_duration_seconds_count{{method=\"RegisterModule\",{svc}}}")
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "nlb_audit_events_total{method=\"UpdateRouting\",result=\"denied\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "nlb_audit_events_total{method=\"UpdateRouting\",result=\"ok\"}"
        ),
        2.0
    );
}

fn write_tokens(path: &Path, entries: &[(&str, &str, &str)]) {
    let mut text = String::from("tokens:\n");
    for (name, role, rest) in entries {
        text.push_str(&format!("  - {{name: {name}, role: {role}, {rest}}}\n"));
    }
    std::fs::write(path, text).unwrap();
}

/// An NLB reading its tokens from a file; the temp dir holding it lives as
/// long as the returned guard.
async fn start_with_tokens_file(
    entries: &[(&str, &str, &str)],
    reload: u64,
) -> (TestNlb, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.yaml");
    write_tokens(&file, entries);
    let t = TestNlb::start_with(&format!(
        "auth: {{tokens_file: {:?}, reload_interval_seconds: {reload}}}",
        file.display().to_string()
    ))
    .await;
    (t, dir, file)
}

#[tokio::test]
async fn a_module_token_acts_only_for_the_instances_it_registered() {
    let a = "module-a-secret-0123456789";
    let b = "module-b-secret-0123456789";
    let (t, _dir, _file) = start_with_tokens_file(
        &[
            ("alb-token", "module", &format!("token: {a}")),
            (
                "db-token",
                "module",
                &format!("token: {b}, module_type: dblb"),
            ),
            (
                "ops",
                "operator",
                &format!("sha256: {}", hex_sha256(OPERATOR)),
            ),
        ],
        0,
    )
    .await;
    let mut c = t.client.clone();
    let alb = || {
        register_req(
            instance("alb-1", ModuleType::Alb, "127.0.0.1:7001", None),
            vec![],
        )
    };
    let reg_id = c
        .register_module(bearer(alb(), a))
        .await
        .unwrap()
        .into_inner()
        .registration_id;

    // Another module token cannot beat, report, re-register or unregister it,
    // even knowing the registration id.
    let hb = pb::HeartbeatRequest {
        instance_id: "alb-1".into(),
        registration_id: reg_id.clone(),
        ..Default::default()
    };
    let (code, msg) = code_of(c.heartbeat(bearer(hb.clone(), b)).await);
    assert_eq!(code, Code::PermissionDenied);
    assert!(
        msg.contains("instance alb-1 was registered by another token"),
        "{msg}"
    );
    let (code, _) = code_of(c.register_module(bearer(alb(), b)).await);
    assert_eq!(code, Code::PermissionDenied);
    let report = pb::ReportMetricsRequest {
        instance_id: "alb-1".into(),
        metrics: Some(pb::ModuleMetrics {
            instance_id: "alb-1".into(),
            ..Default::default()
        }),
        reported_at: None,
    };
    let (code, _) = code_of(c.report_metrics(bearer(report, b)).await);
    assert_eq!(code, Code::PermissionDenied);
    let unreg = pb::UnregisterModuleRequest {
        instance_id: "alb-1".into(),
        registration_id: reg_id.clone(),
        graceful: false,
        drain_timeout_seconds: 0,
    };
    let (code, _) = code_of(c.unregister_module(bearer(unreg, b)).await);
    assert_eq!(code, Code::PermissionDenied);

    // A token limited to dblb registers dblb instances only.
    let (code, msg) = code_of(
        c.register_module(bearer(
            register_req(
                instance("alb-2", ModuleType::Alb, "127.0.0.1:7002", None),
                vec![],
            ),
            b,
        ))
        .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("may register dblb instances only"), "{msg}");
    c.register_module(bearer(
        register_req(
            instance("db-1", ModuleType::Dblb, "127.0.0.1:7003", None),
            vec![],
        ),
        b,
    ))
    .await
    .expect("its own type registers");

    // The owner still beats and renews; an operator may remove it.
    assert!(
        c.heartbeat(bearer(hb, a))
            .await
            .unwrap()
            .into_inner()
            .acknowledged
    );
    let renewed = c
        .register_module(bearer(alb(), a))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.registration_id, reg_id);
    let gone = c
        .unregister_module(bearer(
            pb::UnregisterModuleRequest {
                instance_id: "alb-1".into(),
                ..Default::default()
            },
            OPERATOR,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(gone.success);
    let m = scrape(t.admin_addr).await;
    assert_eq!(
        sample(
            &m,
            "nlb_audit_events_total{method=\"UnregisterModule\",result=\"ok\"}"
        ),
        1.0
    );
}

fn hex_sha256(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[tokio::test]
async fn a_changed_tokens_file_applies_without_a_restart_and_a_bad_one_is_refused() {
    let old = "old-viewer-secret-0123456789";
    let new = "new-viewer-secret-0123456789";
    let (t, _dir, file) =
        start_with_tokens_file(&[("v", "viewer", &format!("token: {old}"))], 1).await;
    let mut c = t.client.clone();
    assert!(c.list_modules(bearer(list(), old)).await.is_ok());

    write_tokens(&file, &[("v", "viewer", &format!("token: {new}"))]);
    eventually("the new tokens file is in force", SOON, || {
        let mut c = c.clone();
        async move { c.list_modules(bearer(list(), new)).await.is_ok() }
    })
    .await;
    let (code, _) = code_of(c.list_modules(bearer(list(), old)).await);
    assert_eq!(code, Code::Unauthenticated);

    // A broken file is refused; the tokens in force stay.
    std::fs::write(&file, "tokens: [{name: v, role: superuser, token: x}]").unwrap();
    let admin = t.admin_addr;
    eventually(
        "the broken file was tried and refused",
        SOON,
        || async move {
            sample(
                &scrape(admin).await,
                "nlb_auth_reloads_total{result=\"failed\"}",
            ) >= 1.0
        },
    )
    .await;
    assert!(c.list_modules(bearer(list(), new)).await.is_ok());

    // SIGHUP (here: the reload it triggers) reads the file at once.
    write_tokens(&file, &[("v", "viewer", &format!("token: {old}"))]);
    let _ = t.nlb.reload();
    assert!(c.list_modules(bearer(list(), old)).await.is_ok());
}

#[tokio::test]
async fn with_no_tokens_the_api_is_open_and_says_so() {
    let t = TestNlb::start().await;
    let mut c = t.client.clone();
    assert!(c.update_routing(update_routes()).await.is_ok());
    let status = t.status().await;
    assert_eq!(status.details["auth"], "off");
    assert_eq!(status.details["grpc_tls"], "off");
    let m = scrape(t.admin_addr).await;
    assert_eq!(sample(&m, "nlb_auth_enabled"), 0.0);
    // Open changes are audited too, as the anonymous caller.
    assert_eq!(
        sample(
            &m,
            "nlb_audit_events_total{method=\"UpdateRouting\",result=\"ok\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn security_settings_cannot_be_changed_through_the_api() {
    let t = TestNlb::start().await;
    for section in ["auth", "tls"] {
        let resp = t
            .client
            .clone()
            .update_nlb_config(pb::UpdateNlbConfigRequest {
                config: Some(pb::ConfigUpdate {
                    config_type: section.into(),
                    config_data: "{}".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        let msg = match resp {
            Ok(r) => {
                let r = r.into_inner();
                assert!(!r.success, "{section} was accepted");
                r.message
            }
            Err(s) => s.message().to_string(),
        };
        assert!(msg.contains("not through the API"), "{section}: {msg}");
    }
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

/// A test PKI: a CA, and certificates it signs, written as PEM files.
struct Pki {
    dir: PathBuf,
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
    ca_pem: String,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        std::fs::write(dir.join(format!("{name}-ca.crt")), &ca_pem).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca_params,
            ca_key,
            ca_pem,
        }
    }

    fn ca_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-ca.crt"))
    }

    /// A leaf certificate for `localhost` and 127.0.0.1; returns (cert, key) PEM.
    fn leaf(&self, client: bool) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a leaf to `<stem>.crt` and `<stem>.key`.
    fn write_leaf(&self, stem: &str, client: bool) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(client);
        let (c, k) = (
            self.dir.join(format!("{stem}.crt")),
            self.dir.join(format!("{stem}.key")),
        );
        // Key first: a reload between the writes sees a mismatched pair and
        // keeps the old one, then the next check picks up both.
        std::fs::write(&k, key).unwrap();
        std::fs::write(&c, cert).unwrap();
        (c, k)
    }
}

async fn tls_channel(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn start_nlb(dir: &Path, config: &str) -> nlb::Running {
    let file = dir.join("nlb.yaml");
    std::fs::write(
        &file,
        format!(
            "grpc: {{listen: \"127.0.0.1:0\", handshake_timeout_seconds: 5}}\nadmin: {{listen: \"127.0.0.1:0\"}}\nstate_file: {:?}\nhealth: {{active_checks: false}}\n{config}",
            dir.join("state.json").display().to_string()
        ),
    )
    .unwrap();
    let store = nlb::config::ConfigStore::load(Some(file), Box::new(|_| None)).unwrap();
    nlb::start(nlb::Nlb::new(store)).await.expect("NLB starts")
}

/// `GET path` over TLS to the admin port, presenting `identity` if given:
/// the status code and the whole response, or why it failed.
async fn admin_get_tls(
    addr: SocketAddr,
    path: &str,
    ca_pem: &str,
    identity: Option<(String, String)>,
) -> Result<(u16, String), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let attempt = async {
        let mut s = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no status in {text:?}"))?;
        Ok((status, text))
    };
    tokio::time::timeout(SOON, attempt)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// The status of `GET /healthz` over TLS to the admin port.
async fn admin_health_tls(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<(String, String)>,
) -> Result<u16, String> {
    admin_get_tls(addr, "/healthz", ca_pem, identity)
        .await
        .map(|(status, _)| status)
}

#[tokio::test]
async fn tls_on_the_grpc_port_and_mutual_tls_on_the_admin_port() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "one");
    let (cert, key) = pki.write_leaf("server", false);
    let running = start_nlb(dir.path(), &format!(
        "tls:\n  reload_interval_seconds: 1\n  grpc: {{cert_file: {:?}, key_file: {:?}}}\n  admin: {{cert_file: {:?}, key_file: {:?}, client_ca_file: {:?}}}\n",
        cert, key, cert, key, pki.ca_file("one")
    ))
    .await;

    // gRPC over TLS works; plaintext does not reach the service.
    let ch = tls_channel(running.grpc_addr, &pki.ca_pem, None)
        .await
        .expect("TLS connect");
    let mut client = NlbServiceClient::new(ch);
    let status = client
        .get_nlb_status(pb::GetNlbStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.details["grpc_tls"], "on");
    assert_eq!(status.details["admin_tls"], "mutual");
    let plain = Endpoint::from_shared(format!("http://{}", running.grpc_addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    let refused = match plain.connect().await {
        Err(_) => true,
        Ok(ch) => NlbServiceClient::new(ch)
            .list_modules(list())
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a plaintext client got an answer from the TLS port"
    );

    // Admin: a client certificate from the CA is required.
    let client_id = pki.leaf(true);
    assert_eq!(
        admin_health_tls(running.admin_addr, &pki.ca_pem, Some(client_id.clone())).await,
        Ok(200)
    );
    assert!(admin_health_tls(running.admin_addr, &pki.ca_pem, None)
        .await
        .is_err());
    let stranger = Pki::new(dir.path(), "stranger").leaf(true);
    assert!(
        admin_health_tls(running.admin_addr, &pki.ca_pem, Some(stranger))
            .await
            .is_err()
    );

    // The server certificate is replaced on disk by one from another CA: new
    // connections get it, the connection already up keeps working.
    let two = Pki::new(dir.path(), "two");
    let (new_cert, new_key) = two.leaf(false);
    std::fs::write(&key, new_key).unwrap();
    std::fs::write(&cert, new_cert).unwrap();
    let addr = running.grpc_addr;
    let ca_two = two.ca_pem.clone();
    eventually("new connections present the new certificate", SOON, || {
        let ca_two = ca_two.clone();
        async move { tls_channel(addr, &ca_two, None).await.is_ok() }
    })
    .await;
    assert!(tls_channel(addr, &pki.ca_pem, None).await.is_err());
    assert!(client
        .get_nlb_status(pb::GetNlbStatusRequest::default())
        .await
        .is_ok());
    let (_, m) = admin_get_tls(running.admin_addr, "/metrics", &two.ca_pem, Some(client_id))
        .await
        .expect("/metrics over mutual TLS");
    assert!(
        sample(&m, "nlb_tls_reloads_total{port=\"grpc\",result=\"ok\"}") >= 1.0,
        "{m}"
    );
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn mutual_tls_on_the_grpc_port_needs_a_client_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "one");
    let (cert, key) = pki.write_leaf("server", false);
    let running = start_nlb(
        dir.path(),
        &format!(
            "tls:\n  grpc: {{cert_file: {:?}, key_file: {:?}, client_ca_file: {:?}}}\n",
            cert,
            key,
            pki.ca_file("one")
        ),
    )
    .await;
    let addr = running.grpc_addr;
    let call = |ch: Channel| async move {
        NlbServiceClient::new(ch)
            .list_modules(list())
            .await
            .map(|_| ())
    };
    let ch = tls_channel(addr, &pki.ca_pem, Some(pki.leaf(true)))
        .await
        .expect("mutual TLS connect");
    assert!(call(ch).await.is_ok());
    // Without a client certificate, or with one from another CA: no answer.
    for id in [None, Some(Pki::new(dir.path(), "other").leaf(true))] {
        let refused = match tls_channel(addr, &pki.ca_pem, id).await {
            Err(_) => true,
            Ok(ch) => call(ch).await.is_err(),
        };
        assert!(refused);
    }
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_missing_certificate_or_tokens_file_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for (config, want) in [
        (
            format!(
                "tls: {{grpc: {{cert_file: {:?}, key_file: {:?}}}}}",
                dir.path().join("missing.crt"),
                dir.path().join("missing.key")
            ),
            "missing.crt",
        ),
        (
            format!("auth: {{tokens_file: {:?}}}", dir.path().join("nope.yaml")),
            "nope.yaml",
        ),
    ] {
        let file = dir.path().join("nlb.yaml");
        std::fs::write(
            &file,
            format!(
                "grpc: {{listen: \"127.0.0.1:0\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\nstate_file: {:?}\n{config}\n",
                dir.path().join("state.json")
            ),
        )
        .unwrap();
        let store = nlb::config::ConfigStore::load(Some(file), Box::new(|_| None)).unwrap();
        let err = nlb::start(nlb::Nlb::new(store))
            .await
            .err()
            .expect("the start fails");
        assert!(err.to_string().contains(want), "{err}");
    }
}

#[tokio::test]
async fn a_heartbeat_stream_is_bound_to_its_token_like_the_unary_call() {
    let a = "module-a-secret-0123456789";
    let b = "module-b-secret-0123456789";
    let (t, _dir, _file) = start_with_tokens_file(
        &[
            ("alb-token", "module", &format!("token: {a}")),
            ("other", "module", &format!("token: {b}")),
            ("grafana", "viewer", &format!("token: {VIEWER}")),
        ],
        0,
    )
    .await;
    let mut c = t.client.clone();
    let reg = c
        .register_module(bearer(
            register_req(
                instance("alb-1", ModuleType::Alb, "127.0.0.1:7001", None),
                vec![],
            ),
            a,
        ))
        .await
        .unwrap()
        .into_inner();
    let beat = pb::HeartbeatRequest {
        instance_id: "alb-1".into(),
        registration_id: reg.registration_id,
        ..Default::default()
    };
    let open = |token: &'static str, first: pb::HeartbeatRequest| {
        let mut c = c.clone();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(first).await.unwrap();
            let mut s = c
                .heartbeat_stream(bearer(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    token,
                ))
                .await?
                .into_inner();
            let answer = s.message().await;
            drop(tx);
            answer
        }
    };
    let ok = open(a, beat.clone()).await.unwrap().unwrap();
    assert!(ok.acknowledged);
    let err = open(b, beat.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("registered by another token"),
        "{}",
        err.message()
    );
    let err = open(VIEWER, beat).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("HeartbeatStream needs a module"),
        "{}",
        err.message()
    );
}
