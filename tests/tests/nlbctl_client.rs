//! `nlbctl` on the client side, without a real NLB: exit codes of usage
//! errors and unreachable addresses, the bearer token on every call (checked
//! by a recording gRPC server), the requests and output of the `rollout`
//! commands (against the same recorder), and TLS and mutual TLS against
//! in-test TLS servers. nlbctl against the real NLB's own auth and TLS belongs with the
//! NLB's security tests, once the NLB serves them.

use std::sync::{Arc, Mutex};

use e2e::free_addr;
use e2e::nlbctl::{nlbctl, nlbctl_at, spawn_nlbctl, CtlRun};
use e2e::pki::Pki;
use e2e::EXIT_DEADLINE;
use shared_types::pb::{
    self,
    nlb_service_server::{NlbService, NlbServiceServer},
    HealthStatus, ModuleType, RolloutEventKind, RolloutState,
};
use shared_types::time::from_unix_millis;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
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

/// A rollout RPC's request, as the recorder received it.
#[derive(Debug, Clone, PartialEq)]
enum RolloutCall {
    Start(Box<pb::StartRolloutRequest>),
    Get(pb::GetRolloutRequest),
    List(pb::ListRolloutsRequest),
    Promote(pb::PromoteRolloutRequest),
    Pause(pb::PauseRolloutRequest),
    Resume(pb::ResumeRolloutRequest),
    Rollback(pb::RollbackRolloutRequest),
    Watch(pb::WatchRolloutRequest),
}

/// Records the `authorization` header of every call; answers
/// UNAUTHENTICATED without one and PERMISSION_DENIED to `Bearer denied`.
/// Records the requests of the rollout RPCs too, and answers them with
/// [`canned_rollout`] (`NOT_FOUND` for an id it does not know).
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Seen>>,
    rollout_calls: Arc<Mutex<Vec<RolloutCall>>>,
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

    /// Checks the token, records the request, and finds the rollout.
    fn rollout_call<T>(
        &self,
        name: &str,
        r: &Request<T>,
        call: RolloutCall,
        id: &str,
    ) -> Result<pb::Rollout, Status> {
        self.check(name, r)?;
        self.rollout_calls.lock().unwrap().push(call);
        canned_rollout(id).ok_or_else(|| Status::not_found(format!("no rollout {id}")))
    }

    fn take_rollout_calls(&self) -> Vec<RolloutCall> {
        std::mem::take(&mut *self.rollout_calls.lock().unwrap())
    }
}

fn sample(version: &str, requests: i64, failures: i64, p99: f64) -> pb::RolloutSample {
    pb::RolloutSample {
        version: version.into(),
        instances: 1,
        requests,
        failures,
        error_rate: failures as f64 / requests as f64,
        p99_latency_ms: p99,
    }
}

/// The canned rollouts, all of alb from v1 to v2: `r-1` rolled back at its
/// first step (started, an analysis that failed, rolled back), `r-2`
/// succeeded (started, an analysis that passed, succeeded), `r-3` running
/// (started).
fn canned_events(id: &str) -> Vec<pb::RolloutEvent> {
    let event = |sequence: u64, kind: RolloutEventKind, message: &str| pb::RolloutEvent {
        sequence,
        rollout_id: id.into(),
        at: Some(from_unix_millis((1_800_000_000 + sequence) * 1000)),
        kind: kind as i32,
        step: 0,
        canary_weight: 10,
        message: message.into(),
        canary: None,
        baseline: None,
    };
    let started = event(
        1,
        RolloutEventKind::Started,
        "10% of new alb connections to v2",
    );
    match id {
        "r-1" => {
            let mut failed = event(
                2,
                RolloutEventKind::AnalysisFailed,
                "canary error rate 2.5% is above 1%",
            );
            failed.canary = Some(sample("v2", 120, 3, 40.0));
            failed.baseline = Some(sample("v1", 1000, 1, 35.0));
            let mut rolled_back = event(3, RolloutEventKind::RolledBack, "the analysis failed");
            rolled_back.canary_weight = 0;
            vec![started, failed, rolled_back]
        }
        "r-2" => {
            let mut passed = event(2, RolloutEventKind::AnalysisPassed, "");
            passed.canary = Some(sample("v2", 200, 0, 20.0));
            passed.baseline = Some(sample("v1", 1800, 0, 21.0));
            let mut succeeded = event(3, RolloutEventKind::Succeeded, "v2 takes all alb traffic");
            succeeded.step = 1;
            succeeded.canary_weight = 100;
            vec![started, passed, succeeded]
        }
        _ => vec![started],
    }
}

/// Rollout `id` (see [`canned_events`]), if there is one.
fn canned_rollout(id: &str) -> Option<pb::Rollout> {
    let (state, current_step, canary_weight, reason) = match id {
        "r-1" => (RolloutState::RolledBack, 0, 0, "the analysis failed"),
        "r-2" => (RolloutState::Succeeded, 1, 100, ""),
        "r-3" => (RolloutState::Running, 0, 10, ""),
        _ => return None,
    };
    let finished = state != RolloutState::Running;
    Some(pb::Rollout {
        rollout_id: id.into(),
        module_type: ModuleType::Alb as i32,
        baseline_version: "v1".into(),
        canary_version: "v2".into(),
        steps: vec![
            pb::RolloutStep {
                canary_weight: 10,
                hold_seconds: 60,
            },
            pb::RolloutStep {
                canary_weight: 100,
                hold_seconds: 0,
            },
        ],
        analysis: Some(pb::RolloutAnalysis {
            max_error_rate: 0.01,
            ..Default::default()
        }),
        sticky: false,
        state: state as i32,
        current_step,
        canary_weight,
        started_at: Some(from_unix_millis(1_800_000_001_000)),
        step_started_at: Some(from_unix_millis(1_800_000_001_000)),
        finished_at: finished.then(|| from_unix_millis(1_800_000_003_000)),
        reason: reason.into(),
        events: canned_events(id),
        blue_green: false,
    })
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

    async fn start_rollout(
        &self,
        r: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::StartRolloutResponse>, Status> {
        let call = RolloutCall::Start(Box::new(r.get_ref().clone()));
        // Any id given is r-1's; none is r-1 as well (the NLB makes one).
        // Whatever was asked, the answer is r-3, just started.
        let rollout = self.rollout_call("StartRollout", &r, call, "r-3")?;
        Ok(Response::new(pb::StartRolloutResponse {
            rollout: Some(rollout),
        }))
    }

    async fn get_rollout(
        &self,
        r: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::GetRolloutResponse>, Status> {
        let id = r.get_ref().rollout_id.clone();
        let call = RolloutCall::Get(r.get_ref().clone());
        let rollout = self.rollout_call("GetRollout", &r, call, &id)?;
        Ok(Response::new(pb::GetRolloutResponse {
            rollout: Some(rollout),
        }))
    }

    async fn list_rollouts(
        &self,
        r: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let call = RolloutCall::List(*r.get_ref());
        self.rollout_call("ListRollouts", &r, call, "r-1")?;
        Ok(Response::new(pb::ListRolloutsResponse {
            rollouts: ["r-3", "r-1", "r-2"]
                .into_iter()
                .filter_map(canned_rollout)
                .collect(),
        }))
    }

    async fn promote_rollout(
        &self,
        r: Request<pb::PromoteRolloutRequest>,
    ) -> Result<Response<pb::PromoteRolloutResponse>, Status> {
        let id = r.get_ref().rollout_id.clone();
        let call = RolloutCall::Promote(r.get_ref().clone());
        let rollout = self.rollout_call("PromoteRollout", &r, call, &id)?;
        Ok(Response::new(pb::PromoteRolloutResponse {
            rollout: Some(rollout),
        }))
    }

    async fn pause_rollout(
        &self,
        r: Request<pb::PauseRolloutRequest>,
    ) -> Result<Response<pb::PauseRolloutResponse>, Status> {
        let id = r.get_ref().rollout_id.clone();
        let reason = r.get_ref().reason.clone();
        let call = RolloutCall::Pause(r.get_ref().clone());
        let mut rollout = self.rollout_call("PauseRollout", &r, call, &id)?;
        rollout.state = RolloutState::Paused as i32;
        rollout.reason = reason;
        Ok(Response::new(pb::PauseRolloutResponse {
            rollout: Some(rollout),
        }))
    }

    async fn resume_rollout(
        &self,
        r: Request<pb::ResumeRolloutRequest>,
    ) -> Result<Response<pb::ResumeRolloutResponse>, Status> {
        let id = r.get_ref().rollout_id.clone();
        let call = RolloutCall::Resume(r.get_ref().clone());
        let rollout = self.rollout_call("ResumeRollout", &r, call, &id)?;
        Ok(Response::new(pb::ResumeRolloutResponse {
            rollout: Some(rollout),
        }))
    }

    async fn rollback_rollout(
        &self,
        r: Request<pb::RollbackRolloutRequest>,
    ) -> Result<Response<pb::RollbackRolloutResponse>, Status> {
        let id = r.get_ref().rollout_id.clone();
        let call = RolloutCall::Rollback(r.get_ref().clone());
        let rollout = self.rollout_call("RollbackRollout", &r, call, &id)?;
        Ok(Response::new(pb::RollbackRolloutResponse {
            rollout: Some(rollout),
        }))
    }

    async fn watch_rollout(
        &self,
        r: Request<pb::WatchRolloutRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<pb::RolloutEvent>>, Status> {
        let id = r.get_ref().rollout_id.clone();
        let after = r.get_ref().after_sequence;
        let call = RolloutCall::Watch(r.get_ref().clone());
        let rollout = self.rollout_call("WatchRollout", &r, call, &id)?;
        // The events after `after`, then the end once the rollout has
        // finished; a running one's stream stays open.
        let events: Vec<Result<pb::RolloutEvent, Status>> = canned_events(&id)
            .into_iter()
            .filter(|e| e.sequence > after)
            .map(Ok)
            .collect();
        let events = tokio_stream::iter(events);
        if rollout.state == RolloutState::Running as i32 {
            Ok(Response::new(Box::pin(
                events.chain(tokio_stream::pending()),
            )))
        } else {
            Ok(Response::new(Box::pin(events)))
        }
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

/// `nlbctl --addr AT --token t ARGS...` against the recorder.
async fn ctl_as_operator(at: &str, args: &[&str]) -> CtlRun {
    nlbctl(&[&["--addr", at, "--token", "t"][..], args].concat(), &[]).await
}

#[tokio::test]
async fn rollout_commands_send_what_was_asked_and_print_the_answer() {
    use RolloutCall::*;
    let (recorder, at) = serve_recorder(None).await;

    // A canary rollout with every flag.
    let run = ctl_as_operator(
        &at,
        &[
            "rollout",
            "start",
            "alb",
            "--canary",
            "v2",
            "--baseline",
            "v1",
            "--steps",
            "10:60,25:2m,100:0",
            "--interval",
            "15",
            "--min-requests",
            "50",
            "--max-error-rate",
            "1%",
            "--max-error-rate-increase",
            "0.005",
            "--max-p99-ms",
            "250",
            "--max-p99-ratio",
            "1.5",
            "--sticky",
            "--id",
            "r-3",
        ],
    )
    .await;
    run.expect_code(0);
    assert_eq!(run.stdout, "r-3: alb v1 -> v2, RUNNING, step 1/2 at 10%\n");
    let step = |canary_weight, hold_seconds| pb::RolloutStep {
        canary_weight,
        hold_seconds,
    };
    assert_eq!(
        recorder.take_rollout_calls(),
        [Start(Box::new(pb::StartRolloutRequest {
            module_type: ModuleType::Alb as i32,
            baseline_version: "v1".into(),
            canary_version: "v2".into(),
            steps: vec![step(10, 60), step(25, 120), step(100, 0)],
            analysis: Some(pb::RolloutAnalysis {
                interval_seconds: 15,
                min_requests: 50,
                max_error_rate: 0.01,
                max_error_rate_increase: 0.005,
                max_p99_latency_ms: 250.0,
                max_p99_latency_ratio: 1.5,
            }),
            sticky: true,
            rollout_id: "r-3".into(),
            blue_green: None,
        }))]
    );

    // The least: everything else is the NLB's default.
    let run = ctl_as_operator(
        &at,
        &["rollout", "start", "rtmp", "--canary", "v2", "--json"],
    )
    .await;
    run.expect_code(0);
    let doc = run.json();
    assert_eq!(doc["rollout"]["state"], "running");
    assert_eq!(doc["rollout"]["rollout_id"], "r-3");
    assert_eq!(
        recorder.take_rollout_calls(),
        [Start(Box::new(pb::StartRolloutRequest {
            module_type: ModuleType::Rtmp as i32,
            canary_version: "v2".into(),
            ..Default::default()
        }))]
    );

    // Blue/green: blue is the baseline, green the canary, with --weight.
    ctl_as_operator(
        &at,
        &[
            "rollout",
            "start",
            "MODULE_TYPE_DBLB",
            "--blue-green",
            "--canary",
            "v2",
            "--baseline",
            "v1",
            "--weight",
            "25",
        ],
    )
    .await
    .expect_code(0);
    assert_eq!(
        recorder.take_rollout_calls(),
        [Start(Box::new(pb::StartRolloutRequest {
            module_type: ModuleType::Dblb as i32,
            baseline_version: "v1".into(),
            canary_version: "v2".into(),
            blue_green: Some(pb::BlueGreenConfig {
                blue_version: "v1".into(),
                green_version: "v2".into(),
                blue_weight: 75,
                green_weight: 25,
                ..Default::default()
            }),
            ..Default::default()
        }))]
    );

    // Bad steps: a usage error naming the step, and nothing sent.
    recorder.take();
    let run = ctl_as_operator(
        &at,
        &[
            "rollout",
            "start",
            "alb",
            "--canary",
            "v2",
            "--steps",
            "10:60,5:60",
        ],
    )
    .await;
    run.expect_code(2);
    assert!(
        run.stderr.contains("step 2 \"5:60\": weights must rise"),
        "{}",
        run.stderr
    );
    let run = ctl_as_operator(
        &at,
        &[
            "rollout",
            "start",
            "alb",
            "--blue-green",
            "--canary",
            "v2",
            "--sticky",
        ],
    )
    .await;
    run.expect_code(2);
    assert!(recorder.take_rollout_calls().is_empty());
    assert!(recorder.take().is_empty(), "usage errors send nothing");

    // status: the block, then the events with the analysis samples.
    let run = ctl_as_operator(&at, &["rollout", "status", "r-1"]).await;
    run.expect_code(0);
    assert_eq!(
        recorder.take_rollout_calls(),
        [Get(pb::GetRolloutRequest {
            rollout_id: "r-1".into()
        })]
    );
    assert_eq!(
        run.stdout,
        "rollout:   r-1\n\
         type:      alb\n\
         versions:  v1 -> v2\n\
         mode:      canary\n\
         state:     ROLLED_BACK\n\
         step:      1/2 at 0% (since 2027-01-15T08:00:01Z)\n\
         steps:     10:60,100:0\n\
         analysis:  window default, min requests default; rolls back on error rate > 1%\n\
         started:   2027-01-15T08:00:01Z\n\
         finished:  2027-01-15T08:00:03Z\n\
         reason:    the analysis failed\n\
         \n\
         EVENTS (most recent)\n\
         SEQ  TIME                  KIND             STEP  WEIGHT  MESSAGE\n\
         1    2027-01-15T08:00:01Z  STARTED          1     10%     10% of new alb connections to v2\n\
         2    2027-01-15T08:00:02Z  ANALYSIS_FAILED  1     10%     canary error rate 2.5% is above 1% \
         (canary 3/120 err 2.5% p99 40ms | baseline 1/1000 err 0.1% p99 35ms)\n\
         3    2027-01-15T08:00:03Z  ROLLED_BACK      1     0%      the analysis failed\n"
    );
    let doc = ctl_as_operator(&at, &["rollout", "status", "r-1", "--json"])
        .await
        .json();
    let r = &doc["rollout"];
    assert_eq!(r["state"], "rolled_back");
    assert_eq!(r["module_type"], "alb");
    assert_eq!(r["finished_at"], "2027-01-15T08:00:03.000Z");
    assert_eq!(r["events"][1]["kind"], "analysis_failed");
    assert_eq!(r["events"][1]["canary"]["failures"], 3);
    assert_eq!(r["events"][1]["baseline"]["p99_latency_ms"], 35.0);
    assert_eq!(r["steps"][1]["canary_weight"], 100);
    recorder.take_rollout_calls();

    // list: oldest first (then by id), with its two filters.
    let run = ctl_as_operator(&at, &["rollout", "list", "--type", "alb", "--active"]).await;
    run.expect_code(0);
    assert_eq!(
        recorder.take_rollout_calls(),
        [List(pb::ListRolloutsRequest {
            module_type: ModuleType::Alb as i32,
            active_only: true,
        })]
    );
    assert_eq!(
        run.stdout,
        "ID   TYPE  MODE    BASELINE  CANARY  STATE        STEP  WEIGHT  STARTED               REASON\n\
         r-1  alb   canary  v1        v2      ROLLED_BACK  1/2   0%      2027-01-15T08:00:01Z  the analysis failed\n\
         r-2  alb   canary  v1        v2      SUCCEEDED    2/2   100%    2027-01-15T08:00:01Z  -\n\
         r-3  alb   canary  v1        v2      RUNNING      1/2   10%     2027-01-15T08:00:01Z  -\n"
    );
    let doc = ctl_as_operator(&at, &["rollout", "list", "--json"])
        .await
        .json();
    assert_eq!(doc["rollouts"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        recorder.take_rollout_calls(),
        [List(pb::ListRolloutsRequest::default())]
    );

    // The changes print the resulting rollout's one line.
    let run = ctl_as_operator(&at, &["rollout", "promote", "r-2", "--full"]).await;
    run.expect_code(0);
    assert_eq!(
        run.stdout,
        "r-2: alb v1 -> v2, SUCCEEDED, step 2/2 at 100%\n"
    );
    let run = ctl_as_operator(&at, &["rollout", "pause", "r-3", "--reason", "lunch break"]).await;
    run.expect_code(0);
    assert_eq!(
        run.stdout,
        "r-3: alb v1 -> v2, PAUSED, step 1/2 at 10% (lunch break)\n"
    );
    ctl_as_operator(&at, &["rollout", "resume", "r-3"])
        .await
        .expect_code(0);
    let run = ctl_as_operator(&at, &["rollout", "rollback", "r-1", "--reason", "bad"]).await;
    run.expect_code(0);
    assert_eq!(
        run.stdout,
        "r-1: alb v1 -> v2, ROLLED_BACK, step 1/2 at 0% (the analysis failed)\n"
    );
    ctl_as_operator(&at, &["rollout", "promote", "r-3"])
        .await
        .expect_code(0);
    ctl_as_operator(&at, &["rollout", "pause", "r-3"])
        .await
        .expect_code(0);
    assert_eq!(
        recorder.take_rollout_calls(),
        [
            Promote(pb::PromoteRolloutRequest {
                rollout_id: "r-2".into(),
                full: true
            }),
            Pause(pb::PauseRolloutRequest {
                rollout_id: "r-3".into(),
                reason: "lunch break".into()
            }),
            Resume(pb::ResumeRolloutRequest {
                rollout_id: "r-3".into()
            }),
            Rollback(pb::RollbackRolloutRequest {
                rollout_id: "r-1".into(),
                reason: "bad".into()
            }),
            Promote(pb::PromoteRolloutRequest {
                rollout_id: "r-3".into(),
                full: false
            }),
            Pause(pb::PauseRolloutRequest {
                rollout_id: "r-3".into(),
                reason: String::new()
            }),
        ]
    );
    let doc = ctl_as_operator(&at, &["rollout", "resume", "r-3", "--json"])
        .await
        .json();
    assert_eq!(doc["rollout"]["state"], "running");

    // Unknown ids: exit 5 with the NLB's message, for every command.
    for cmd in ["status", "promote", "pause", "resume", "rollback", "watch"] {
        let run = ctl_as_operator(&at, &["rollout", cmd, "r-9"]).await;
        run.expect_code(5);
        assert_eq!(
            run.stderr,
            format!("nlbctl: rollout {cmd} r-9: NOT_FOUND: no rollout r-9\n")
        );
        assert_eq!(run.stdout, "");
    }

    // The token goes on rollout calls too; without one, exit 4.
    recorder.take();
    nlbctl(&["--addr", &at, "rollout", "status", "r-1"], &[])
        .await
        .expect_code(4);
    nlbctl(&["--addr", &at, "rollout", "watch", "r-1"], &[])
        .await
        .expect_code(4);
    assert_eq!(
        recorder.take(),
        [
            ("GetRollout".to_string(), None),
            ("WatchRollout".to_string(), None)
        ]
    );
}

#[tokio::test]
async fn rollout_watch_prints_events_and_exits_by_how_the_rollout_ended() {
    use RolloutCall::*;
    let (recorder, at) = serve_recorder(None).await;
    let watch = |id: &str, after| {
        Watch(pb::WatchRolloutRequest {
            rollout_id: id.into(),
            after_sequence: after,
        })
    };

    // Three events, then the end, rolled back: exit 7.
    let run = ctl_as_operator(&at, &["rollout", "watch", "r-1"]).await;
    run.expect_code(7);
    assert_eq!(
        run.stdout,
        "2027-01-15T08:00:01Z  1  STARTED  step 1 at 10%  10% of new alb connections to v2\n\
         2027-01-15T08:00:02Z  2  ANALYSIS_FAILED  step 1 at 10%  canary error rate 2.5% is above 1% \
         (canary 3/120 err 2.5% p99 40ms | baseline 1/1000 err 0.1% p99 35ms)\n\
         2027-01-15T08:00:03Z  3  ROLLED_BACK  step 1 at 0%  the analysis failed\n"
    );
    assert_eq!(
        run.stderr,
        "nlbctl: rollout watch r-1: the rollout finished ROLLED_BACK\n"
    );
    assert_eq!(
        recorder.take_rollout_calls(),
        [watch("r-1", 0)],
        "no more calls"
    );

    // Succeeded: exit 0. With --json, one object per line.
    let run = ctl_as_operator(&at, &["rollout", "watch", "r-2", "--json"]).await;
    run.expect_code(0);
    let events: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["started", "analysis_passed", "succeeded"]);
    assert_eq!(events[1]["canary"]["requests"], 200);
    assert_eq!(events[2]["at"], "2027-01-15T08:00:03.000Z");
    assert_eq!(events[2]["step"], 1);
    assert_eq!(recorder.take_rollout_calls(), [watch("r-2", 0)]);

    // --after: only later events; when none says how it ended, nlbctl asks.
    let run = ctl_as_operator(&at, &["rollout", "watch", "r-1", "--after", "2"]).await;
    run.expect_code(7);
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.stdout);
    let run = ctl_as_operator(&at, &["rollout", "watch", "r-1", "--after", "3"]).await;
    run.expect_code(7);
    assert_eq!(run.stdout, "");
    assert_eq!(
        recorder.take_rollout_calls(),
        [
            watch("r-1", 2),
            watch("r-1", 3),
            Get(pb::GetRolloutRequest {
                rollout_id: "r-1".into()
            }),
        ]
    );

    // A running rollout's stream stays open; Ctrl-C ends the watch, exit 0.
    let mut watching = spawn_nlbctl(
        &["--addr", &at, "--token", "t", "rollout", "watch", "r-3"],
        &[],
    );
    let line = watching
        .next_line(EXIT_DEADLINE)
        .await
        .expect("the first event");
    assert!(line.contains("  1  STARTED  step 1 at 10%  "), "{line}");
    watching.signal("INT");
    assert_eq!(watching.wait_exit().await.code(), Some(0));
    assert_eq!(recorder.take_rollout_calls(), [watch("r-3", 0)]);
}
