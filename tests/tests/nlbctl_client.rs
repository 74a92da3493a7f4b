//! `nlbctl` on the client side, without a real NLB: exit codes of usage
//! errors and unreachable addresses, the bearer token on every call (checked
//! by a recording gRPC server), and TLS and mutual TLS against in-test TLS
//! servers. nlbctl against the real NLB's own auth and TLS belongs with the
//! NLB's security tests, once the NLB serves them.

use std::sync::{Arc, Mutex};

use e2e::free_addr;
use e2e::nlbctl::{nlbctl, nlbctl_at, CtlRun};
use e2e::pki::Pki;
use shared_types::pb::{
    self,
    nlb_service_server::{NlbService, NlbServiceServer},
    HealthStatus,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

#[tokio::test]
async fn exit_codes_without_an_nlb() {
    let nowhere = free_addr();
    let run = nlbctl_at(&nowhere, &["status"]).await;
    run.expect_code(3);
    assert!(
        run.stderr
            .starts_with(&format!("nlbctl: cannot reach the NLB at {nowhere}: ")),
        "{}",
        run.stderr
    );
    nlbctl_at(&nowhere, &["modules", "list", "--json"])
        .await
        .expect_code(3);
    nlbctl_at(&nowhere, &["metrics", "--watch"])
        .await
        .expect_code(3);
    // Files are checked before connecting.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("routes.yaml");
    std::fs::write(&bad, "- {route_id: x, protocol: tcp}\n").unwrap();
    let run = nlbctl_at(&nowhere, &["routes", "apply", bad.to_str().unwrap()]).await;
    run.expect_code(6);
    assert!(run.stderr.contains("routes[0].metadata"), "{}", run.stderr);

    // Usage errors: exit 2.
    for args in [
        &[][..],
        &["bogus"],
        &["modules"],
        &["modules", "show"],
        &["scale", "alb"],
        &["scale", "alb", "--up", "--to", "2"],
        &["routes", "dry-run", "--port", "80"],
        &["metrics", "--interval", "2"],
        &["--addr", "not an address", "status"],
        &["--addr", "https://127.0.0.1:1", "status"],
        &["--cert", "c.pem", "--key", "k.pem", "status"],
        &["--ca-cert", "/nonexistent/ca.pem", "status"],
        &["--token-file", "/nonexistent/token", "status"],
        &["--token", "a", "--token-file", "b", "status"],
        &["--timeout", "-1", "status"],
    ] {
        let run = nlbctl(args, &[]).await;
        assert_eq!(run.code, Some(2), "nlbctl {args:?}: {}", run.stderr);
        assert!(!run.stderr.is_empty(), "nlbctl {args:?} says why");
    }
    let run = nlbctl(&["--addr", "https://127.0.0.1:1", "status"], &[]).await;
    assert!(run.stderr.contains("--ca-cert"), "{}", run.stderr);
    let run = nlbctl(
        &["status"],
        &[("NLBCTL_TOKEN", "a"), ("NLBCTL_TOKEN_FILE", "b")],
    )
    .await;
    run.expect_code(2);
    // Help and version are not errors.
    let run = nlbctl(&["--help"], &[]).await;
    run.expect_code(0);
    assert!(run.stdout.contains("Usage: nlbctl"), "{}", run.stdout);
    nlbctl(&["routes", "apply", "--help"], &[])
        .await
        .expect_code(0);
    let run = nlbctl(&["--version"], &[]).await;
    run.expect_code(0);
    assert_eq!(
        run.stdout,
        format!("nlbctl {}\n", env!("CARGO_PKG_VERSION"))
    );
    let run = nlbctl(&["status"], &[("NLBCTL_TIMEOUT", "soon")]).await;
    run.expect_code(2);
    assert!(
        run.stderr.contains("\"soon\" is not a number of seconds"),
        "{}",
        run.stderr
    );
    // NLBCTL_ADDR is the default address.
    let run = nlbctl(&["status"], &[("NLBCTL_ADDR", &nowhere)]).await;
    run.expect_code(3);
    assert!(run.stderr.contains(&nowhere), "{}", run.stderr);
}

/// Calls seen by the recorder: (RPC, `authorization` header).
type Seen = Vec<(String, Option<String>)>;

/// Records the `authorization` header of every call; answers
/// UNAUTHENTICATED without one and PERMISSION_DENIED to `Bearer denied`.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Seen>>,
}

impl Recorder {
    fn check<T>(&self, call: &str, r: &Request<T>) -> Result<(), Status> {
        let auth = r
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().expect("ASCII").to_string());
        self.seen
            .lock()
            .unwrap()
            .push((call.to_string(), auth.clone()));
        match auth.as_deref() {
            None => Err(Status::unauthenticated("a bearer token is required")),
            Some("Bearer denied") => {
                Err(Status::permission_denied("viewer tokens may not do that"))
            }
            Some(_) => Ok(()),
        }
    }

    fn take(&self) -> Seen {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

#[tonic::async_trait]
impl NlbService for Recorder {
    async fn get_nlb_status(
        &self,
        r: Request<pb::GetNlbStatusRequest>,
    ) -> Result<Response<pb::GetNlbStatusResponse>, Status> {
        self.check("GetNLBStatus", &r)?;
        Ok(Response::new(pb::GetNlbStatusResponse {
            status: HealthStatus::Healthy as i32,
            version: "recorder".into(),
            ..Default::default()
        }))
    }

    async fn list_modules(
        &self,
        r: Request<pb::ListModulesRequest>,
    ) -> Result<Response<pb::ListModulesResponse>, Status> {
        self.check("ListModules", &r)?;
        Ok(Response::new(pb::ListModulesResponse::default()))
    }

    async fn stream_nlb_metrics(
        &self,
        r: Request<pb::StreamNlbMetricsRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<pb::StreamNlbMetricsResponse>>, Status> {
        self.check("StreamNLBMetrics", &r)?;
        // One update, then the server ends the stream.
        let update = pb::StreamNlbMetricsResponse {
            timestamp: Some(shared_types::time::now()),
            ..Default::default()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(update)]))))
    }
}

/// Serves the recorder on a loopback port, with TLS if given.
async fn serve_recorder(tls: Option<ServerTlsConfig>) -> (Recorder, String) {
    let recorder = Recorder::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).expect("server TLS config");
    }
    tokio::spawn(
        builder
            .add_service(NlbServiceServer::new(recorder.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (recorder, addr)
}

fn assert_secret_kept(run: &CtlRun, secret: &str) {
    assert!(
        !run.stdout.contains(secret) && !run.stderr.contains(secret),
        "the token was printed:\n{}\n{}",
        run.stdout,
        run.stderr
    );
}

#[tokio::test]
async fn the_token_goes_on_every_call_and_is_never_printed() {
    let (recorder, at) = serve_recorder(None).await;
    let secret = "s3cret-operator-token";
    let bearer = Some(format!("Bearer {secret}"));

    let run = nlbctl(&["--addr", &at, "--token", secret, "status"], &[]).await;
    run.expect_code(0);
    assert_secret_kept(&run, secret);
    assert_eq!(
        recorder.take(),
        [("GetNLBStatus".to_string(), bearer.clone())]
    );

    let run = nlbctl(
        &["--addr", &at, "modules", "list"],
        &[("NLBCTL_TOKEN", secret)],
    )
    .await;
    run.expect_code(0);
    assert_secret_kept(&run, secret);
    assert_eq!(
        recorder.take(),
        [("ListModules".to_string(), bearer.clone())]
    );

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{secret}\n")).unwrap();
    let token_path = token_file.to_str().unwrap();
    let run = nlbctl(
        &[
            "--addr",
            &at,
            "--token-file",
            token_path,
            "status",
            "--json",
        ],
        &[],
    )
    .await;
    run.expect_code(0);
    assert_eq!(run.json()["version"], "recorder");
    assert_eq!(
        recorder.take(),
        [("GetNLBStatus".to_string(), bearer.clone())]
    );

    // Streams carry it too; a stream the server ends is a clean exit.
    let run = nlbctl(
        &["--addr", &at, "metrics", "--watch", "--json"],
        &[("NLBCTL_TOKEN_FILE", token_path)],
    )
    .await;
    run.expect_code(0);
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.stdout);
    assert!(
        run.stderr.contains("the NLB ended the stream"),
        "{}",
        run.stderr
    );
    assert_eq!(
        recorder.take(),
        [("StreamNLBMetrics".to_string(), bearer.clone())]
    );

    // A flag beats the environment.
    nlbctl(
        &["--addr", &at, "--token", "other", "status"],
        &[("NLBCTL_TOKEN", secret)],
    )
    .await
    .expect_code(0);
    assert_eq!(
        recorder.take(),
        [("GetNLBStatus".to_string(), Some("Bearer other".to_string()))]
    );

    // No token, or one without the right: exit 4 with the server's message.
    let run = nlbctl(&["--addr", &at, "status"], &[]).await;
    run.expect_code(4);
    assert_eq!(
        run.stderr,
        "nlbctl: status: UNAUTHENTICATED: a bearer token is required\n"
    );
    assert_eq!(recorder.take(), [("GetNLBStatus".to_string(), None)]);
    let run = nlbctl(
        &["--addr", &at, "--token", "denied", "modules", "list"],
        &[],
    )
    .await;
    run.expect_code(4);
    assert!(
        run.stderr
            .starts_with("nlbctl: modules list: PERMISSION_DENIED: "),
        "{}",
        run.stderr
    );
    assert_eq!(
        recorder.take(),
        [("ListModules".to_string(), Some("Bearer denied".to_string()))]
    );

    // Never printed: not by --help, not in a refusal.
    let run = nlbctl(&["--help"], &[("NLBCTL_TOKEN", secret)]).await;
    run.expect_code(0);
    assert_secret_kept(&run, secret);
    let bad = format!("{secret}\u{7f}");
    let run = nlbctl(&["--addr", &at, "status"], &[("NLBCTL_TOKEN", &bad)]).await;
    run.expect_code(2);
    assert_secret_kept(&run, secret);
    assert!(
        recorder.take().is_empty(),
        "a bad token is refused before any call"
    );
}

#[tokio::test]
async fn tls_and_mutual_tls_on_the_client_side() {
    // The server's certificate names nlb.test only, not 127.0.0.1.
    let pki = Pki::generate(&["nlb.test"]);
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write(dir.path());
    let path = |p: &std::path::Path| p.display().to_string();
    let (ca, cert, key) = (
        path(&files.ca),
        path(&files.client_cert),
        path(&files.client_key),
    );
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = path(&Pki::generate(&["nlb.test"]).write(other_dir.path()).ca);

    // Server TLS only.
    let (recorder, at) = serve_recorder(Some(
        ServerTlsConfig::new().identity(Identity::from_pem(&pki.server_cert, &pki.server_key)),
    ))
    .await;
    let run = nlbctl(
        &[
            "--addr",
            &at,
            "--ca-cert",
            &ca,
            "--tls-server-name",
            "nlb.test",
            "--token",
            "t",
            "status",
        ],
        &[],
    )
    .await;
    run.expect_code(0);
    assert_eq!(
        recorder.take(),
        [("GetNLBStatus".to_string(), Some("Bearer t".to_string()))]
    );
    let https = format!("https://{at}");
    let env = [
        ("NLBCTL_CA_CERT", ca.as_str()),
        ("NLBCTL_TLS_SERVER_NAME", "nlb.test"),
        ("NLBCTL_TOKEN", "t"),
    ];
    nlbctl(&["--addr", &https, "status"], &env)
        .await
        .expect_code(0);
    // Plain text to a TLS server: the connection breaks, exit 3, with a hint.
    let run = nlbctl(&["--addr", &at, "status"], &[]).await;
    run.expect_code(3);
    assert!(run.stderr.contains("give --ca-cert"), "{}", run.stderr);
    // The certificate names nlb.test, not 127.0.0.1; another CA signed nothing here.
    let run = nlbctl(&["--addr", &at, "--ca-cert", &ca, "status"], &[]).await;
    run.expect_code(3);
    assert!(
        run.stderr
            .starts_with(&format!("nlbctl: cannot reach the NLB at {at}: ")),
        "{}",
        run.stderr
    );
    nlbctl(
        &[
            "--addr",
            &at,
            "--ca-cert",
            &other_ca,
            "--tls-server-name",
            "nlb.test",
            "status",
        ],
        &[],
    )
    .await
    .expect_code(3);

    // Mutual TLS: the server requires a client certificate signed by the CA.
    let (recorder, at) = serve_recorder(Some(
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&pki.server_cert, &pki.server_key))
            .client_ca_root(Certificate::from_pem(&pki.ca)),
    ))
    .await;
    let mtls = [
        "--addr",
        &at,
        "--ca-cert",
        &ca,
        "--tls-server-name",
        "nlb.test",
        "--token",
        "t",
    ];
    let run = nlbctl(
        &[
            &mtls[..],
            &["--cert", &cert, "--key", &key, "modules", "list", "--json"],
        ]
        .concat(),
        &[],
    )
    .await;
    run.expect_code(0);
    assert_eq!(run.json()["total_modules"], 0);
    assert_eq!(
        recorder.take(),
        [("ListModules".to_string(), Some("Bearer t".to_string()))]
    );
    let env = [("NLBCTL_CERT", cert.as_str()), ("NLBCTL_KEY", key.as_str())];
    nlbctl(&[&mtls[..], &["status"]].concat(), &env)
        .await
        .expect_code(0);
    assert_eq!(recorder.take().len(), 1);
    // Without a client certificate the server refuses the connection.
    // Without a client certificate the server refuses the connection (with
    // TLS 1.3 after the handshake, so the first call fails): exit 3, with a
    // hint.
    let run = nlbctl(&[&mtls[..], &["status"]].concat(), &[]).await;
    run.expect_code(3);
    assert!(
        run.stderr
            .starts_with(&format!("nlbctl: cannot reach the NLB at {at}: "))
            && run.stderr.contains("give --cert and --key"),
        "{}",
        run.stderr
    );
    assert!(
        recorder.take().is_empty(),
        "no call got through without a client certificate"
    );
}
