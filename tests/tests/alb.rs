//! The ALB (`alb`) end to end: the real binary registered with a real NLB,
//! real clients (curl over HTTP/1.1, HTTP/2 prior knowledge and HTTPS with
//! SNI and ALPN; a tonic gRPC client) against in-test origins, a real nginx
//! and a real tonic server. The NLB's L4 data plane does not exist yet, so
//! the clients reach the ALB's data port directly.
//!
//! Every test asserts on what a user would check: which origin answered,
//! what it received, the bytes, the status and the error text. Nothing
//! asserts on how long anything took; waits are bounded polls.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use e2e::alb::{cluster, curl, curl_stdout, seen, stack, start_nginx, AlbProcess, CurlResponse};
use e2e::origin;
use e2e::pki::Pki;
use e2e::{free_addr, Sandbox, CALL_DEADLINE};
use serde_json::{json, Value};
use shared_types::pb::{
    DeleteRouteRequest, GetModuleInfoRequest, GetRoutesRequest, HealthCheckRequest, HealthStatus,
    ListModulesRequest, ModuleType, RateLimit, SetRateLimitRequest, UpdateRoutesRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

// ---------------------------------------------------------------------------
// Helpers

/// The origin names of the answers `curl` printed, one JSON document per
/// line (`-w '\n'` after each); panics on an answer that is not an origin's.
fn origins_in(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not an origin's answer ({e}): {l:?}"));
            v["origin"]
                .as_str()
                .unwrap_or_else(|| panic!("no origin name in {l}"))
                .to_string()
        })
        .collect()
}

/// How many answers each origin gave.
fn tally(names: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_insert(0) += 1;
    }
    m
}

/// `n` sequential GETs of `<url>/<i>` on one keep-alive connection (a curl
/// URL glob); the origin name of each answer, in order.
async fn spread(alb: &AlbProcess, prefix: &str, n: usize) -> Vec<String> {
    let glob = format!("{}[1-{n}]", alb.url(prefix));
    let names = origins_in(&curl_stdout(&["-w", "\\n", &glob]).await);
    assert_eq!(names.len(), n, "{n} answers for {glob}: {names:?}");
    names
}

/// A GET with `Host: host` (and more curl arguments).
async fn get_as(
    sb: &Sandbox,
    alb: &AlbProcess,
    host: &str,
    path: &str,
    more: &[&str],
) -> CurlResponse {
    let host_header = format!("Host: {host}");
    let url = alb.url(path);
    let mut args = vec!["-H", host_header.as_str()];
    args.extend_from_slice(more);
    args.push(&url);
    curl(sb.path(), &args).await
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A file of `n` bytes that are not all the same (and not UTF-8).
fn write_payload(dir: &Path, name: &str, n: usize) -> std::path::PathBuf {
    let bytes: Vec<u8> = (0..n).map(|i| (i * 7 + i / 251) as u8).collect();
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write a payload file");
    p
}

// ---------------------------------------------------------------------------
// 1-2. HTTP/1.1 and h2c, forwarding headers

#[tokio::test(flavor = "multi_thread")]
async fn http1_forwards_with_forwarding_headers_request_ids_and_no_hop_by_hop() {
    let sb = Sandbox::new();
    let web = origin::start("web").await;
    let (_nlb, alb) = stack(
        &sb,
        "alb-h1",
        json!({
            "routes": [{"id": "all", "cluster": "web"}],
            "clusters": [cluster("web", &[&web])],
        }),
    )
    .await;

    let r = get_as(
        &sb,
        &alb,
        "app.example.test",
        "/echo/a?x=1&y=2",
        &[
            "--http1.1",
            "-H",
            "Connection: x-secret",
            "-H",
            "x-secret: 1",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "x-kept: yes",
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.version, "1.1");
    let j = r.json();
    assert_eq!(j["origin"], "web");
    assert_eq!(j["method"], "GET");
    assert_eq!(j["path"], "/echo/a");
    assert_eq!(j["query"], "x=1&y=2");
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(seen(&j, "host"), Some("app.example.test"), "{j}");
    assert_eq!(seen(&j, "x-forwarded-for"), Some("127.0.0.1"), "{j}");
    assert_eq!(seen(&j, "x-forwarded-proto"), Some("http"), "{j}");
    assert_eq!(
        seen(&j, "x-forwarded-host"),
        Some("app.example.test"),
        "{j}"
    );
    assert_eq!(
        seen(&j, "forwarded"),
        Some("for=127.0.0.1;host=\"app.example.test\";proto=http"),
        "{j}"
    );
    assert_eq!(seen(&j, "x-kept"), Some("yes"), "{j}");
    assert!(
        seen(&j, "user-agent").is_some_and(|u| u.starts_with("curl/")),
        "{j}"
    );
    // Hop-by-hop: the headers Connection names, Keep-Alive, and Connection
    // itself (whatever the ALB's own hop says) never carry the client's.
    assert_eq!(seen(&j, "x-secret"), None, "x-secret was forwarded: {j}");
    assert_eq!(seen(&j, "keep-alive"), None, "{j}");
    assert!(
        !seen(&j, "connection").is_some_and(|c| c.contains("x-secret")),
        "{j}"
    );
    // A generated request id, the same on both sides.
    let rid = seen(&j, "x-request-id").expect("the origin got an x-request-id");
    assert!(is_hex_id(rid), "generated x-request-id {rid:?}");
    assert_eq!(r.header("x-request-id"), Some(rid), "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));

    // Another request gets another id.
    let again = get_as(&sb, &alb, "app.example.test", "/echo/b", &[]).await;
    let rid2 = seen(&again.json(), "x-request-id").unwrap().to_string();
    assert!(is_hex_id(&rid2) && rid2 != rid, "{rid} then {rid2}");

    // A client's own x-request-id and X-Forwarded-For are passed on / added to.
    let r = get_as(
        &sb,
        &alb,
        "app.example.test",
        "/echo/c",
        &[
            "-H",
            "x-request-id: client-id-42",
            "-H",
            "X-Forwarded-For: 198.51.100.7",
            "-H",
            "Forwarded: for=198.51.100.7",
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let j = r.json();
    assert_eq!(seen(&j, "x-request-id"), Some("client-id-42"), "{j}");
    assert_eq!(r.header("x-request-id"), Some("client-id-42"));
    assert_eq!(seen(&j, "x-forwarded-for"), Some("198.51.100.7, 127.0.0.1"));
    assert_eq!(
        seen(&j, "forwarded"),
        Some("for=198.51.100.7, for=127.0.0.1;host=\"app.example.test\";proto=http")
    );

    // A body arrives whole, with its method.
    let payload = write_payload(sb.path(), "post.bin", 50_000);
    let data = format!("@{}", payload.display());
    let r = get_as(
        &sb,
        &alb,
        "app.example.test",
        "/upload",
        &["-X", "PUT", "--data-binary", &data],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let j = r.json();
    assert_eq!(j["method"], "PUT");
    assert_eq!(j["body_len"], 50_000);
    assert_eq!(seen(&j, "content-length"), Some("50000"));
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_prior_knowledge_is_served_and_forwarded_over_http1() {
    let sb = Sandbox::new();
    let web = origin::start("web").await;
    let (_nlb, alb) = stack(
        &sb,
        "alb-h2c",
        json!({
            "routes": [{"id": "all", "cluster": "web"}],
            "clusters": [cluster("web", &[&web])],
        }),
    )
    .await;

    let r = curl(
        sb.path(),
        &[
            "--http2-prior-knowledge",
            "-H",
            "x-request-id: h2-id-1",
            &alb.url("/h2/path?q=1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.version, "2", "curl spoke HTTP/2: {r:?}");
    let j = r.json();
    assert_eq!(j["origin"], "web");
    assert_eq!(j["path"], "/h2/path");
    assert_eq!(j["query"], "q=1");
    assert_eq!(j["version"], "HTTP/1.1", "the cluster speaks http1: {j}");
    // :authority becomes the upstream Host.
    assert_eq!(seen(&j, "host"), Some(alb.data_addr.as_str()), "{j}");
    assert_eq!(seen(&j, "x-forwarded-proto"), Some("http"));
    assert_eq!(seen(&j, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen(&j, "x-request-id"), Some("h2-id-1"));
    assert_eq!(r.header("x-request-id"), Some("h2-id-1"));

    // A body over HTTP/2 arrives whole. (One request per curl run: curl
    // 7.88's reuse of a prior-knowledge connection fails with "Error in the
    // HTTP2 framing layer" against nginx too; the gRPC test below sends
    // several requests on one HTTP/2 connection.)
    let payload = write_payload(sb.path(), "h2-post.bin", 70_000);
    let data = format!("@{}", payload.display());
    let r = curl(
        sb.path(),
        &[
            "--http2-prior-knowledge",
            "--data-binary",
            &data,
            &alb.url("/h2/upload"),
        ],
    )
    .await;
    assert_eq!((r.status, r.version.as_str()), (200, "2"), "{r:?}");
    let j = r.json();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["body_len"], 70_000);
    assert_eq!(r.header("content-type"), Some("application/json"));
}

// ---------------------------------------------------------------------------
// 3. HTTPS: certificate by SNI, ALPN

#[tokio::test(flavor = "multi_thread")]
async fn https_picks_the_certificate_by_sni_and_negotiates_h2_by_alpn() {
    let sb = Sandbox::new();
    let web = origin::start("web").await;
    let dir_a = sb.path().join("pki-a");
    let dir_b = sb.path().join("pki-b");
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    // Two CAs, one per name: a certificate that verifies against one CA
    // only is that CA's certificate. (Both CAs have the same subject name,
    // so they cannot share one --cacert bundle: OpenSSL would try the
    // first by name.)
    let a = Pki::generate(&["a.example.test"]).write(&dir_a);
    let b = Pki::generate(&["b.example.test"]).write(&dir_b);
    let (nlb, alb) = stack(
        &sb,
        "alb-tls",
        json!({
            "routes": [{"id": "all", "cluster": "web"}],
            "clusters": [cluster("web", &[&web])],
            "tls": {"certificates": [
                {"cert_file": a.server_cert, "key_file": a.server_key},
                {"cert_file": b.server_cert, "key_file": b.server_key},
            ]},
        }),
    )
    .await;
    let port = alb.data_port();
    let https = |name: &str, cafile: &Path, version: &str| {
        let resolve = format!("{name}:{port}:127.0.0.1");
        let url = format!("https://{name}:{port}/tls/{name}");
        let cafile = cafile.display().to_string();
        let version = version.to_string();
        let dir = sb.path().to_path_buf();
        async move {
            curl(
                &dir,
                &[
                    "-v",
                    &version,
                    "--cacert",
                    &cafile,
                    "--resolve",
                    &resolve,
                    &url,
                ],
            )
            .await
        }
    };

    for (name, other, ca) in [
        ("a.example.test", "b.example.test", &a.ca),
        ("b.example.test", "a.example.test", &b.ca),
    ] {
        // HTTP/1.1 over TLS, verified against the name's own CA.
        let r = https(name, ca, "--http1.1").await;
        assert_eq!(r.exit, 0, "curl failed for {name}: {}", r.stderr);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.ssl_verify_result, 0, "{}", r.stderr);
        assert_eq!(r.version, "1.1");
        assert!(
            r.stderr.contains(&format!("subject: CN={name}")),
            "{name} got another certificate:\n{}",
            r.stderr
        );
        assert!(!r.stderr.contains(&format!("CN={other}")), "{}", r.stderr);
        assert!(
            r.stderr.contains("ALPN: server accepted http/1.1"),
            "{}",
            r.stderr
        );
        let j = r.json();
        assert_eq!(j["origin"], "web");
        assert_eq!(seen(&j, "x-forwarded-proto"), Some("https"), "{j}");
        let host = format!("{name}:{port}");
        assert_eq!(seen(&j, "host"), Some(host.as_str()));
        assert_eq!(
            seen(&j, "forwarded"),
            Some(format!("for=127.0.0.1;host=\"{host}\";proto=https").as_str())
        );

        // ALPN h2.
        let r = https(name, ca, "--http2").await;
        assert_eq!(r.exit, 0, "{}", r.stderr);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.version, "2", "ALPN did not give h2:\n{}", r.stderr);
        assert!(
            r.stderr.contains("ALPN: server accepted h2"),
            "{}",
            r.stderr
        );
        assert!(
            r.stderr.contains(&format!("subject: CN={name}")),
            "{}",
            r.stderr
        );
        assert_eq!(seen(&r.json(), "x-forwarded-proto"), Some("https"));
    }
    // Each name's certificate is refused with the other name's CA.
    for (name, wrong_ca) in [("a.example.test", &b.ca), ("b.example.test", &a.ca)] {
        let r = https(name, wrong_ca, "--http1.1").await;
        assert!(
            r.exit != 0 && r.status == 0,
            "{name} verified against the other CA: {r:?}"
        );
    }

    // A name no certificate serves gets the first (the default).
    let resolve = format!("c.example.test:{port}:127.0.0.1");
    let url = format!("https://c.example.test:{port}/tls/c");
    let r = curl(sb.path(), &["-v", "-k", "--resolve", &resolve, &url]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.stderr.contains("subject: CN=a.example.test"),
        "{}",
        r.stderr
    );

    // Plaintext still works on the same port.
    let r = curl(sb.path(), &[&alb.url("/plain")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(seen(&r.json(), "x-forwarded-proto"), Some("http"));

    // The ALB told the NLB it terminates TLS.
    let info = nlb
        .client()
        .await
        .get_module_info(GetModuleInfoRequest {
            instance_id: "alb-tls".into(),
        })
        .await
        .expect("GetModuleInfo alb-tls")
        .into_inner();
    assert_eq!(info.details["capability.tls_termination"], "true");
}

// ---------------------------------------------------------------------------
// 4. Routing

#[tokio::test(flavor = "multi_thread")]
async fn routes_match_host_path_headers_and_priority() {
    let sb = Sandbox::new();
    let names = [
        "exact-host",
        "wildcard-host",
        "any-host",
        "prefix",
        "exact-path",
        "regex",
        "header",
        "header-any",
        "priority",
    ];
    let mut origins = Vec::new();
    for n in names {
        origins.push(origin::start(n).await);
    }
    let clusters: Vec<Value> = origins.iter().map(|o| cluster(&o.name, &[o])).collect();
    let routes = json!([
        {"id": "r-exact-host", "hosts": ["api.example.test"], "cluster": "exact-host"},
        {"id": "r-wildcard-host", "hosts": ["*.example.test"], "cluster": "wildcard-host"},
        {"id": "r-any-host", "path": {"prefix": "/any/"}, "cluster": "any-host"},
        {"id": "r-prefix", "hosts": ["paths.test"], "path": {"prefix": "/static/"}, "cluster": "prefix"},
        {"id": "r-exact-path", "hosts": ["paths.test"], "path": {"exact": "/static/special"}, "cluster": "exact-path"},
        {"id": "r-regex", "hosts": ["paths.test"], "path": {"regex": "^/v[0-9]+/items$"}, "cluster": "regex"},
        {"id": "r-header", "hosts": ["paths.test"], "path": {"prefix": "/static/"},
         "headers": {"x-canary": "yes"}, "cluster": "header"},
        {"id": "r-header-any", "hosts": ["paths.test"], "path": {"prefix": "/h/"},
         "headers": {"X-Tenant": "*"}, "cluster": "header-any"},
        {"id": "r-priority", "hosts": ["paths.test"], "path": {"regex": "/promo$"},
         "priority": 5, "cluster": "priority"},
    ]);
    let (_nlb, alb) = stack(
        &sb,
        "alb-routes",
        json!({"routes": routes, "clusters": clusters}),
    )
    .await;

    // (host, path, extra headers, expected origin; None = 404)
    let cases: &[(&str, &str, &[&str], Option<&str>)] = &[
        ("api.example.test", "/", &[], Some("exact-host")),
        ("API.Example.Test:8080", "/x", &[], Some("exact-host")),
        ("api.example.test", "/any/x", &[], Some("exact-host")),
        ("www.example.test", "/x", &[], Some("wildcard-host")),
        ("deep.www.example.test", "/", &[], Some("wildcard-host")),
        ("example.test", "/any/1", &[], Some("any-host")),
        ("other.test", "/any/thing", &[], Some("any-host")),
        ("example.test", "/other", &[], None),
        ("paths.test", "/static/a.css", &[], Some("prefix")),
        ("paths.test", "/static/special", &[], Some("exact-path")),
        ("paths.test", "/static/special/more", &[], Some("prefix")),
        ("paths.test", "/v2/items", &[], Some("regex")),
        ("paths.test", "/v2/items/9", &[], None),
        (
            "paths.test",
            "/static/a.css",
            &["x-canary: yes"],
            Some("header"),
        ),
        (
            "paths.test",
            "/static/a.css",
            &["x-canary: no"],
            Some("prefix"),
        ),
        ("paths.test", "/static/promo", &[], Some("priority")),
        (
            "paths.test",
            "/static/promo",
            &["x-canary: yes"],
            Some("priority"),
        ),
        (
            "paths.test",
            "/h/1",
            &["x-tenant: whoever"],
            Some("header-any"),
        ),
        ("paths.test", "/h/1", &[], None),
    ];
    for (host, path, headers, want) in cases {
        let mut more: Vec<&str> = Vec::new();
        for h in *headers {
            more.extend(["-H", h]);
        }
        let r = get_as(&sb, &alb, host, path, &more).await;
        match want {
            Some(origin) => {
                assert_eq!(r.status, 200, "{host} {path} {headers:?}: {}", r.text());
                assert_eq!(
                    r.json()["origin"],
                    *origin,
                    "{host} {path} {headers:?} went to the wrong origin"
                );
            }
            None => {
                assert_eq!(r.status, 404, "{host} {path} {headers:?}: {}", r.text());
                let body = r.text();
                assert!(
                    body.contains(&format!("{host:?}")) && body.contains(&format!("{path:?}")),
                    "the 404 names neither host nor path: {body:?}"
                );
            }
        }
    }
    // Over HTTP/2 the host comes from :authority.
    let url = format!("http://www.example.test:{}/h2", alb.data_port());
    let resolve = format!("www.example.test:{}:127.0.0.1", alb.data_port());
    let r = curl(
        sb.path(),
        &["--http2-prior-knowledge", "--resolve", &resolve, &url],
    )
    .await;
    assert_eq!((r.status, r.version.as_str()), (200, "2"), "{r:?}");
    assert_eq!(r.json()["origin"], "wildcard-host");
    let refused = alb.metric(r#"alb_refused_total{reason="no_route"}"#).await;
    assert_eq!(refused, 3.0, "three requests had no route");
}

// ---------------------------------------------------------------------------
// 5. Errors

/// One cluster per failure; retries off (`attempts: 1`) so each failure is
/// seen as it is.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_failures_answer_502_503_504_saying_what_failed() {
    let sb = Sandbox::new();
    let web = origin::start("web").await;
    let dead = free_addr();
    let (_nlb, alb) = stack(
        &sb,
        "alb-errors",
        json!({
            "routes": [
                {"id": "to-dead", "path": {"prefix": "/dead/"}, "cluster": "dead"},
                {"id": "to-slow", "path": {"prefix": "/slow/"}, "cluster": "slow"},
                {"id": "to-drained", "path": {"prefix": "/drained/"}, "cluster": "drained"},
                {"id": "to-web", "path": {"prefix": "/status/"}, "cluster": "web"},
            ],
            "clusters": [
                {"name": "dead", "endpoints": [{"address": dead}], "retry": {"attempts": 1}},
                {"name": "slow", "endpoints": [{"address": web.addr.to_string()}],
                 "request_timeout_ms": 500, "retry": {"attempts": 1}},
                {"name": "drained", "endpoints": [{"address": web.addr.to_string(), "weight": 0}]},
                {"name": "web", "endpoints": [{"address": web.addr.to_string()}], "retry": {"attempts": 1}},
            ],
        }),
    )
    .await;

    let r = curl(sb.path(), &[&alb.url("/dead/x")]).await;
    assert_eq!(r.status, 502, "{r:?}");
    let body = r.text();
    assert!(
        body.contains("could not connect") && body.contains(&dead) && body.contains("dead"),
        "the 502 does not say which endpoint failed: {body:?}"
    );
    assert!(r.header("x-request-id").is_some_and(is_hex_id));

    let r = curl(sb.path(), &[&alb.url("/slow/5000")]).await;
    assert_eq!(r.status, 504, "{r:?}");
    let body = r.text();
    assert!(
        body.contains(&web.addr.to_string()) && body.contains("within 500 ms"),
        "the 504 does not say what timed out: {body:?}"
    );

    let r = curl(sb.path(), &[&alb.url("/drained/x")]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.text().contains("cluster drained has no endpoint"),
        "{:?}",
        r.text()
    );

    // An origin's own 5xx is passed on as it is, not replaced.
    let r = curl(sb.path(), &[&alb.url("/status/503")]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["origin"], "web", "{r:?}");

    let m = alb.metrics().await;
    let v = |s: &str| e2e::metric_value(&m, s).unwrap_or(0.0);
    assert_eq!(
        v(r#"alb_upstream_errors_total{cluster="dead",kind="connect"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(
        v(r#"alb_upstream_errors_total{cluster="slow",kind="timeout"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(v(r#"alb_refused_total{reason="no_endpoint"}"#), 1.0, "{m}");
    assert_eq!(
        v(r#"alb_requests_total{class="5xx",route="to-dead"}"#),
        1.0,
        "{m}"
    );
}

/// With the default retry settings (2 attempts), a cluster of one endpoint
/// has nowhere to retry: the client should still get the failure itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_single_endpoint_cluster_with_default_retries_still_reports_the_real_failure() {
    let sb = Sandbox::new();
    let web = origin::start("web").await;
    let dead = free_addr();
    let (_nlb, alb) = stack(
        &sb,
        "alb-one",
        json!({
            "routes": [
                {"id": "to-dead", "path": {"prefix": "/dead/"}, "cluster": "dead"},
                {"id": "to-web", "path": {"prefix": "/"}, "cluster": "web"},
            ],
            "clusters": [
                {"name": "dead", "endpoints": [{"address": dead}]},
                {"name": "web", "endpoints": [{"address": web.addr.to_string()}],
                 "request_timeout_ms": 500},
            ],
        }),
    )
    .await;
    let r = curl(sb.path(), &[&alb.url("/dead/x")]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains(&dead), "{:?}", r.text());
    let r = curl(sb.path(), &[&alb.url("/slow/5000")]).await;
    assert_eq!(r.status, 504, "{}", r.text());
    let r = curl(sb.path(), &[&alb.url("/status/503")]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["origin"], "web", "the origin's 503 was replaced");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_limits_answer_413_and_431() {
    let sb = Sandbox::new();
    let web = origin::start("web").await;
    let (_nlb, alb) = stack(
        &sb,
        "alb-limits",
        json!({
            "routes": [{"id": "all", "cluster": "web"}],
            "clusters": [cluster("web", &[&web])],
            "limits": {"max_body_bytes": 1024, "max_headers": 20, "max_header_bytes": 2048},
        }),
    )
    .await;
    let small = write_payload(sb.path(), "small.bin", 1024);
    let big = write_payload(sb.path(), "big.bin", 4000);
    let small_data = format!("@{}", small.display());
    let big_data = format!("@{}", big.display());
    let url = alb.url("/upload");

    // At the limit: forwarded whole.
    let r = curl(sb.path(), &["--data-binary", &small_data, &url]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["body_len"], 1024);

    // Over it, declared by Content-Length: 413 before anything is sent on.
    let hits = web.hits();
    let r = curl(sb.path(), &["--data-binary", &big_data, &url]).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(
        r.text().contains("larger than 1024 bytes"),
        "{:?}",
        r.text()
    );
    assert_eq!(
        web.hits(),
        hits,
        "a declared oversized body reached the origin"
    );

    // Over it, chunked (no length up front): 413 too.
    let r = curl(
        sb.path(),
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &big_data,
            &url,
        ],
    )
    .await;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(
        r.text().contains("larger than 1024 bytes"),
        "{:?}",
        r.text()
    );

    // (HTTP/2: see http2_clients_get_the_413_for_a_body_still_arriving.)

    // Too many headers (limit 20): 431.
    let mut args: Vec<String> = Vec::new();
    for i in 0..30 {
        args.push("-H".into());
        args.push(format!("x-h{i}: {i}"));
    }
    args.push(alb.url("/many-headers"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = curl(sb.path(), &args).await;
    assert_eq!(r.status, 431, "{r:?}");

    // A head over max_header_bytes (2048, below hyper's own 8 KiB buffer
    // minimum): 431 saying so, over HTTP/1.1 and HTTP/2.
    let big_header = format!("x-big: {}", "b".repeat(4000));
    let hits = web.hits();
    let r = curl(sb.path(), &["-H", &big_header, &alb.url("/big-head")]).await;
    assert_eq!(r.status, 431, "{r:?}");
    assert!(
        r.text().contains("headers are larger than 2048 bytes"),
        "{:?}",
        r.text()
    );
    let r = curl(
        sb.path(),
        &[
            "--http2-prior-knowledge",
            "-H",
            &big_header,
            &alb.url("/big-head"),
        ],
    )
    .await;
    assert_eq!((r.status, r.version.as_str()), (431, "2"), "HTTP/2: {r:?}");
    // A head far over hyper's buffer too.
    let huge = format!("x-huge: {}", "h".repeat(100_000));
    let r = curl(sb.path(), &["-H", &huge, &alb.url("/huge")]).await;
    assert_eq!(r.status, 431, "{r:?}");
    assert_eq!(web.hits(), hits, "an oversized head reached the origin");
    // Within the limits all is well.
    let r = curl(sb.path(), &["-H", "x-fine: 1", &alb.url("/fine")]).await;
    assert_eq!(r.status, 200, "{r:?}");

    let m = alb.metrics().await;
    let v = |s: &str| e2e::metric_value(&m, s).unwrap_or(0.0);
    assert_eq!(
        v(r#"alb_refused_total{reason="body_too_large"}"#),
        2.0,
        "{m}"
    );
    assert!(
        v(r#"alb_refused_total{reason="header_too_large"}"#) >= 1.0,
        "{m}"
    );
}

/// Over HTTP/2 a 413 must reach the client even while its body is still
/// on the way (RFC 9113 section 8.1: answer, then RST_STREAM NO_ERROR).
#[tokio::test(flavor = "multi_thread")]
async fn http2_clients_get_the_413_for_a_body_still_arriving() {
    let sb = Sandbox::new();
    let web = origin::start("web").await;
    let (_nlb, alb) = stack(
        &sb,
        "alb-h2-413",
        json!({
            "routes": [{"id": "all", "cluster": "web"}],
            "clusters": [cluster("web", &[&web])],
            "limits": {"max_body_bytes": 1024},
        }),
    )
    .await;
    let big = write_payload(sb.path(), "big.bin", 1_000_000);
    // nghttp shows the frames. (curl 7.88 sometimes reports the RST_STREAM
    // that must follow an early answer as an error even with NO_ERROR.)
    for i in 0..10 {
        let out = tokio::process::Command::new("nghttp")
            .arg("-v")
            .arg("-d")
            .arg(&big)
            .arg(alb.url("/up"))
            .output()
            .await
            .expect("run nghttp (Debian: nghttp2-client)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(":status: 413"), "try {i}: {text}");
        // The answer is complete before the stream is ended, and ended
        // without an error (RFC 9113 8.1: NO_ERROR after an early answer).
        let data_end = text.find("recv DATA frame").expect("a DATA frame");
        let reset = text.find("recv RST_STREAM").expect("an RST_STREAM");
        assert!(data_end < reset, "try {i}: {text}");
        assert!(
            text[reset..].contains("error_code=NO_ERROR"),
            "try {i}: {text}"
        );
    }
}

/// A client whose request bodies are too large is the client's fault: the
/// endpoints that were being sent those bodies must not be ejected for it.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_request_bodies_do_not_eject_endpoints() {
    let sb = Sandbox::new();
    let a = origin::start("a").await;
    let b = origin::start("b").await;
    let (_nlb, alb) = stack(
        &sb,
        "alb-413-eject",
        json!({
            "routes": [{"id": "all", "cluster": "ab"}],
            "clusters": [cluster("ab", &[&a, &b])],
            "limits": {"max_body_bytes": 1024},
        }),
    )
    .await;
    let big = write_payload(sb.path(), "big.bin", 4000);
    let data = format!("@{}", big.display());
    for _ in 0..20 {
        let r = curl(
            sb.path(),
            &[
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &data,
                &alb.url("/up"),
            ],
        )
        .await;
        assert_eq!(r.status, 413, "{r:?}");
    }
    let seen: BTreeSet<String> = spread(&alb, "/after/", 40).await.into_iter().collect();
    assert_eq!(
        seen,
        BTreeSet::from(["a".to_string(), "b".to_string()]),
        "an endpoint was ejected for clients' oversized bodies"
    );
}

/// A client that does not finish its request head in time.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_request_head_gets_408() {
    let sb = Sandbox::new();
    let web = origin::start("web").await;
    let (_nlb, alb) = stack(
        &sb,
        "alb-408",
        json!({
            "routes": [{"id": "all", "cluster": "web"}],
            "clusters": [cluster("web", &[&web])],
            "limits": {"header_read_timeout_ms": 1000},
        }),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(&alb.data_addr)
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: slow.test\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(60), s.read_to_end(&mut got))
        .await
        .expect("the ALB ends a connection whose head is late")
        .ok();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "got {text:?}");
    assert!(
        text.contains("the request headers did not arrive within the limit"),
        "the 408 does not say why: {text:?}"
    );
    alb.eventually("the late head counted as header_timeout", || async {
        (alb.metric(r#"alb_refused_total{reason="header_timeout"}"#)
            .await
            == 1.0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_rate_limit_set_over_module_service_answers_429_with_retry_after() {
    let sb = Sandbox::new();
    let web = origin::start("web").await;
    let (_nlb, alb) = stack(
        &sb,
        "alb-rl",
        json!({
            "routes": [
                {"id": "limited", "path": {"prefix": "/limited/"}, "cluster": "web"},
                {"id": "free", "path": {"prefix": "/free/"}, "cluster": "web"},
            ],
            "clusters": [cluster("web", &[&web])],
        }),
    )
    .await;
    let set = alb
        .client()
        .await
        .set_rate_limit(SetRateLimitRequest {
            instance_id: "alb-rl".into(),
            limit: Some(RateLimit {
                target: "route:limited".into(),
                requests_per_second: 1,
                burst_size: 1,
                enabled: true,
                ..RateLimit::default()
            }),
        })
        .await
        .expect("SetRateLimit")
        .into_inner();
    assert!(set.success, "{set:?}");

    // Twenty requests back to back on one connection: the bucket holds one
    // and gains one a second.
    let glob = format!("{}[1-20]", alb.url("/limited/"));
    let out = curl_stdout(&["-w", "\\n@@%{http_code}|%header{retry-after}\\n", &glob]).await;
    let mut answers: Vec<(u16, String, String)> = Vec::new();
    let mut body = String::new();
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("@@") {
            let (code, retry) = rest.split_once('|').unwrap();
            answers.push((
                code.parse().unwrap(),
                retry.to_string(),
                body.trim().to_string(),
            ));
            body.clear();
        } else {
            body.push_str(line);
            body.push('\n');
        }
    }
    assert_eq!(answers.len(), 20, "{out}");
    assert_eq!(answers[0].0, 200, "the first request has its token: {out}");
    let limited: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    assert!(!limited.is_empty(), "no 429 in 20 requests at 1/s: {out}");
    for (_, retry_after, body) in &limited {
        let secs: u64 = retry_after
            .parse()
            .unwrap_or_else(|_| panic!("Retry-After {retry_after:?} is not whole seconds"));
        assert!(secs >= 1, "Retry-After {secs}");
        assert!(
            body.contains("rate limited by rl-1 on route:limited"),
            "the 429 does not say which limit: {body:?}"
        );
    }
    assert!(
        answers.iter().all(|a| a.0 == 200 || a.0 == 429),
        "{answers:?}"
    );
    let refused = alb
        .metric(r#"alb_refused_total{reason="rate_limited"}"#)
        .await;
    assert_eq!(refused, limited.len() as f64);

    // Another route is not limited.
    let names = spread(&alb, "/free/", 10).await;
    assert_eq!(names, vec!["web"; 10]);
}

// ---------------------------------------------------------------------------
// 6. Balancing

#[tokio::test(flavor = "multi_thread")]
async fn weighted_balancing_stays_within_spread_and_round_robin_is_exact() {
    let sb = Sandbox::new();
    let light = origin::start("light").await;
    let heavy = origin::start("heavy").await;
    let eps = json!([
        {"address": light.addr.to_string(), "weight": 1},
        {"address": heavy.addr.to_string(), "weight": 3},
    ]);
    let (_nlb, alb) = stack(
        &sb,
        "alb-balance",
        json!({
            "routes": [
                {"id": "lr", "path": {"prefix": "/lr/"}, "cluster": "lr"},
                {"id": "rr", "path": {"prefix": "/rr/"}, "cluster": "rr"},
                {"id": "rand", "path": {"prefix": "/rand/"}, "cluster": "rand"},
            ],
            "clusters": [
                {"name": "lr", "endpoints": eps, "balance": "least_request"},
                {"name": "rr", "endpoints": eps, "balance": "round_robin"},
                {"name": "rand", "endpoints": eps, "balance": "random"},
            ],
        }),
    )
    .await;

    // Sequential requests leave nothing in flight, so least_request draws by
    // weight like random: 400 draws at p = 1/4 give 100 ± 8.7 (one standard
    // deviation); the allowed spread is ±40, over four and a half of them.
    for prefix in ["/lr/", "/rand/"] {
        let counts = tally(&spread(&alb, prefix, 400).await);
        let l = counts.get("light").copied().unwrap_or(0);
        let h = counts.get("heavy").copied().unwrap_or(0);
        assert_eq!(l + h, 400, "{prefix}: {counts:?}");
        assert!(
            (60..=140).contains(&l),
            "{prefix}: light got {l}: {counts:?}"
        );
        assert!(
            (260..=340).contains(&h),
            "{prefix}: heavy got {h}: {counts:?}"
        );
    }
    // Smooth weighted round robin is exact, and interleaves (never two
    // lights in a row).
    let names = spread(&alb, "/rr/", 400).await;
    let counts = tally(&names);
    assert_eq!(counts.get("light"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("heavy"), Some(&300), "{counts:?}");
    for w in names.windows(4) {
        assert_eq!(
            w.iter().filter(|n| *n == "light").count(),
            1,
            "round robin 1:3 gives one light in every four in a row: {w:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 7. Retries, outlier ejection, active health checks

#[tokio::test(flavor = "multi_thread")]
async fn connect_failures_are_retried_and_the_dead_endpoint_is_ejected() {
    let sb = Sandbox::new();
    let live = origin::start("live").await;
    let dead = free_addr();
    let (_nlb, alb) = stack(
        &sb,
        "alb-retry",
        json!({
            "routes": [{"id": "all", "cluster": "flaky"}],
            "clusters": [{
                "name": "flaky",
                "endpoints": [{"address": dead}, {"address": live.addr.to_string()}],
                "outlier": {"consecutive_failures": 3, "base_ejection_ms": 600000,
                            "max_ejection_ms": 600000},
            }],
        }),
    )
    .await;
    let names = spread(&alb, "/r/", 40).await;
    assert_eq!(
        names,
        vec!["live"; 40],
        "every GET succeeded on the live endpoint"
    );
    let m = alb.metrics().await;
    let v = |s: &str| e2e::metric_value(&m, s).unwrap_or(0.0);
    let retries = v(r#"alb_retries_total{cluster="flaky"}"#);
    let connects = v(r#"alb_upstream_errors_total{cluster="flaky",kind="connect"}"#);
    assert!(
        retries >= 1.0,
        "no retry in 40 requests over a dead endpoint:\n{m}"
    );
    assert_eq!(retries, connects, "each connect failure was retried:\n{m}");
    // Ejected after 3 failures in a row: it gets no more attempts.
    assert_eq!(connects, 3.0, "{m}");
    let more = spread(&alb, "/s/", 40).await;
    assert_eq!(more, vec!["live"; 40]);
    assert_eq!(
        alb.metric(r#"alb_upstream_errors_total{cluster="flaky",kind="connect"}"#)
            .await,
        3.0,
        "the ejected endpoint was tried again"
    );
    let health = alb
        .client()
        .await
        .health_check(HealthCheckRequest {
            instance_id: String::new(),
            deep_check: false,
        })
        .await
        .expect("HealthCheck")
        .into_inner();
    let check = health
        .checks
        .iter()
        .find(|(k, _)| k.ends_with("cluster.flaky"))
        .map(|(_, v)| v.as_str());
    assert_eq!(check, Some("1 of 2 endpoint(s) usable"), "{health:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_failing_its_health_check_gets_no_traffic_until_it_recovers() {
    let sb = Sandbox::new();
    let a = origin::start("a").await;
    let b = origin::start("b").await;
    let (_nlb, alb) = stack(
        &sb,
        "alb-hc",
        json!({
            "routes": [{"id": "all", "cluster": "hc"}],
            "clusters": [{
                "name": "hc",
                "endpoints": [{"address": a.addr.to_string()}, {"address": b.addr.to_string()}],
                "balance": "round_robin",
                // Generous probe timeouts: a busy machine must not fail b.
                "health_check": {"path": "/healthz", "interval_ms": 1000, "timeout_ms": 1000,
                                 "healthy_threshold": 1, "unhealthy_threshold": 2},
            }],
        }),
    )
    .await;
    let both: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
    alb.eventually("both endpoints get traffic", || async {
        let seen: BTreeSet<String> = spread(&alb, "/x/", 10).await.into_iter().collect();
        (seen == both).then_some(())
    })
    .await;

    a.set_health(500);
    alb.eventually("a is out after failing /healthz", || async {
        let names = spread(&alb, "/x/", 10).await;
        names.iter().all(|n| n == "b").then_some(())
    })
    .await;
    // And it stays out while it fails.
    assert_eq!(spread(&alb, "/y/", 20).await, vec!["b"; 20]);

    a.set_health(200);
    alb.eventually("a is back after passing /healthz", || async {
        let names = spread(&alb, "/z/", 10).await;
        names.iter().any(|n| n == "a").then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------
// 8. Routes over ModuleService

fn contract_route(id: &str, host: &str, path: &str, cluster: &str) -> shared_types::pb::Route {
    shared_types::pb::Route {
        route_id: id.into(),
        destination_pattern: host.into(),
        path_pattern: path.into(),
        metadata: [("upstream".to_string(), cluster.to_string())].into(),
        ..Default::default()
    }
}

async fn route_ids(alb: &AlbProcess) -> BTreeSet<String> {
    alb.client()
        .await
        .get_routes(GetRoutesRequest {
            instance_id: alb.instance_id.clone(),
            ..Default::default()
        })
        .await
        .expect("GetRoutes")
        .into_inner()
        .routes
        .into_iter()
        .map(|r| r.route_id)
        .collect()
}

/// Which origin answered (`None` for a 404), asserting nothing else failed.
async fn lands(sb: &Sandbox, alb: &AlbProcess, host: &str, path: &str) -> Option<String> {
    let r = get_as(sb, alb, host, path, &[]).await;
    match r.status {
        200 => Some(r.json()["origin"].as_str().unwrap().to_string()),
        404 => None,
        s => panic!("{host} {path}: {s} {}", r.text()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn update_routes_and_delete_route_change_routing_without_dropping_requests() {
    let sb = Sandbox::new();
    let blue = origin::start("blue").await;
    let green = origin::start("green").await;
    let (_nlb, alb) = stack(
        &sb,
        "alb-update",
        json!({
            "routes": [{"id": "base", "path": {"prefix": "/slow/"}, "cluster": "blue"}],
            "clusters": [cluster("blue", &[&blue]), cluster("green", &[&green])],
        }),
    )
    .await;
    let mut c = alb.client().await;
    assert_eq!(lands(&sb, &alb, "new.example.test", "/x/1").await, None);

    let r = c
        .update_routes(UpdateRoutesRequest {
            instance_id: "alb-update".into(),
            routes: vec![
                contract_route("new", "new.example.test", "/x", "green"),
                contract_route("new-exact", "", "=/exact", "green"),
                contract_route("new-regex", "", "~^/r[0-9]+$", "green"),
            ],
            replace_all: false,
        })
        .await
        .expect("UpdateRoutes")
        .into_inner();
    assert!(r.success, "{r:?}");
    assert_eq!(r.routes_updated, 3);
    for (host, path, want) in [
        ("new.example.test", "/x/1", Some("green")),
        ("other.test", "/x/1", None),
        ("any.test", "/exact", Some("green")),
        ("any.test", "/exact/more", None),
        ("any.test", "/r42", Some("green")),
        ("any.test", "/r42x", None),
        ("any.test", "/slow/1", Some("blue")),
    ] {
        assert_eq!(
            lands(&sb, &alb, host, path).await.as_deref(),
            want,
            "{host} {path}"
        );
    }
    let all: BTreeSet<String> = ["base", "new", "new-exact", "new-regex"]
        .map(String::from)
        .into();
    assert_eq!(route_ids(&alb).await, all);

    // A route to a cluster the ALB does not have is refused, naming it, and
    // nothing changes.
    let err = c
        .update_routes(UpdateRoutesRequest {
            instance_id: "alb-update".into(),
            routes: vec![contract_route("bad", "", "/bad", "nope")],
            replace_all: false,
        })
        .await
        .expect_err("a route to an unknown cluster");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("nope"), "{err:?}");
    let err = c
        .update_routes(UpdateRoutesRequest {
            instance_id: "alb-update".into(),
            routes: vec![contract_route("bad", "", "bad-path", "green")],
            replace_all: false,
        })
        .await
        .expect_err("a path pattern that is none");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("path_pattern"), "{err:?}");
    assert_eq!(route_ids(&alb).await, all);
    assert_eq!(lands(&sb, &alb, "any.test", "/bad").await, None);
    assert_eq!(
        lands(&sb, &alb, "new.example.test", "/x/2")
            .await
            .as_deref(),
        Some("green")
    );

    let d = c
        .delete_route(DeleteRouteRequest {
            instance_id: "alb-update".into(),
            route_id: "new".into(),
        })
        .await
        .expect("DeleteRoute")
        .into_inner();
    assert!(d.success, "{d:?}");
    assert_eq!(lands(&sb, &alb, "new.example.test", "/x/1").await, None);
    let err = c
        .delete_route(DeleteRouteRequest {
            instance_id: "alb-update".into(),
            route_id: "new".into(),
        })
        .await
        .expect_err("deleting it twice");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // A request in flight when the routes are replaced (its own route
    // removed) completes.
    let started = blue.hits();
    let dir = sb.path().to_path_buf();
    let url = alb.url("/slow/5000");
    let in_flight = tokio::spawn(async move { curl(&dir, &[&url]).await });
    alb.eventually("the slow request reached blue", || async {
        (blue.hits() > started).then_some(())
    })
    .await;
    let r = c
        .update_routes(UpdateRoutesRequest {
            instance_id: "alb-update".into(),
            routes: vec![contract_route("after", "", "/after", "green")],
            replace_all: true,
        })
        .await
        .expect("UpdateRoutes replace_all")
        .into_inner();
    assert!(r.success, "{r:?}");
    let done = in_flight.await.expect("the in-flight curl task");
    assert_eq!(
        done.status, 200,
        "the in-flight request was dropped: {done:?}"
    );
    assert_eq!(done.json()["origin"], "blue");
    assert_eq!(done.json()["path"], "/slow/5000");
    assert_eq!(lands(&sb, &alb, "any.test", "/slow/1").await, None);
    assert_eq!(
        lands(&sb, &alb, "any.test", "/after").await.as_deref(),
        Some("green")
    );
    assert_eq!(route_ids(&alb).await, BTreeSet::from(["after".to_string()]));
}

// ---------------------------------------------------------------------------
// 9. nginx behind the ALB

#[tokio::test(flavor = "multi_thread")]
async fn a_file_from_nginx_arrives_byte_for_byte_over_http1_and_h2c() {
    let sb = Sandbox::new();
    let www = sb.path().join("www");
    std::fs::create_dir_all(www.join("files")).unwrap();
    let file = write_payload(&www.join("files"), "blob.bin", 300_000);
    let expected = std::fs::read(&file).unwrap();
    std::fs::write(www.join("files/hello.txt"), "hello from nginx\n").unwrap();
    let nginx = start_nginx(sb.path(), &www).await;
    let (_nlb, alb) = stack(
        &sb,
        "alb-nginx",
        json!({
            "routes": [{"id": "files", "path": {"prefix": "/files/"}, "cluster": "nginx"}],
            "clusters": [{"name": "nginx", "endpoints": [{"address": nginx.addr}]}],
        }),
    )
    .await;

    for (version, spoken) in [("--http1.1", "1.1"), ("--http2-prior-knowledge", "2")] {
        let r = curl(sb.path(), &[version, &alb.url("/files/blob.bin")]).await;
        assert_eq!(r.status, 200, "{version}: {r:?}\n{}", nginx.error_log());
        assert_eq!(r.version, spoken);
        assert_eq!(r.body.len(), expected.len(), "{version}");
        assert!(r.body == expected, "{version}: the bytes differ");
        assert_eq!(r.header("content-length"), Some("300000"), "{version}");
        assert!(
            r.header("server").is_some_and(|s| s.starts_with("nginx")),
            "{version}: {:?}",
            r.headers
        );
        assert!(r.header("x-request-id").is_some_and(is_hex_id));

        let r = curl(sb.path(), &[version, &alb.url("/files/hello.txt")]).await;
        assert_eq!(r.status, 200, "{version}: {r:?}");
        assert_eq!(r.text(), "hello from nginx\n");

        // nginx's own 404 comes through as nginx's.
        let r = curl(sb.path(), &[version, &alb.url("/files/missing")]).await;
        assert_eq!(r.status, 404, "{version}: {r:?}");
        assert!(r.text().contains("nginx"), "{version}: {:?}", r.text());
    }
}

// ---------------------------------------------------------------------------
// 10. Registered with the NLB

#[tokio::test(flavor = "multi_thread")]
async fn the_alb_registers_with_the_nlb_with_its_protocols_and_routes() {
    let sb = Sandbox::new();
    let api = origin::start("api").await;
    let (nlb, alb) = stack(
        &sb,
        "alb-reg",
        json!({
            "routes": [
                {"id": "api", "hosts": ["*.api.example.test"],
                 "path": {"prefix": "/v1/"}, "priority": 3, "cluster": "api"},
                {"id": "health", "path": {"exact": "/health"}, "cluster": "api"},
            ],
            "clusters": [cluster("api", &[&api])],
        }),
    )
    .await;
    let mut n = nlb.client().await;
    let modules = n
        .list_modules(ListModulesRequest::default())
        .await
        .expect("ListModules")
        .into_inner()
        .modules;
    let inst = modules
        .iter()
        .find(|m| m.instance_id == "alb-reg")
        .unwrap_or_else(|| panic!("alb-reg is not listed: {modules:?}"));
    assert_eq!(inst.module_type, ModuleType::Alb as i32);
    assert_eq!(inst.address, alb.grpc_addr);
    assert_eq!(inst.metadata["data_address"], alb.data_addr);
    // The ALB and this crate share the workspace version.
    assert_eq!(inst.version, env!("CARGO_PKG_VERSION"));

    let info = nlb
        .eventually("alb-reg healthy at the NLB", || {
            let mut n = n.clone();
            async move {
                let i = n
                    .get_module_info(GetModuleInfoRequest {
                        instance_id: "alb-reg".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                (i.instance.as_ref()?.health_status == HealthStatus::Healthy as i32).then_some(i)
            }
        })
        .await;
    assert_eq!(
        info.details["capability.protocols"],
        "http,https,http2,grpc,websocket"
    );
    assert_eq!(info.details["capability.websocket"], "true");
    assert_eq!(info.details["capability.tls_termination"], "false");
    let mut routes = info.routes.clone();
    routes.sort_by(|a, b| a.route_id.cmp(&b.route_id));
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert_eq!(routes[0].route_id, "api");
    assert_eq!(routes[0].destination_pattern, "*.api.example.test");
    assert_eq!(routes[0].path_pattern, "/v1/");
    assert_eq!(routes[0].priority, 3);
    assert_eq!(routes[0].metadata["upstream"], "api");
    assert_eq!(routes[1].route_id, "health");
    assert_eq!(routes[1].destination_pattern, "");
    assert_eq!(routes[1].path_pattern, "=/health");

    // A route added over ModuleService is announced to the NLB.
    alb.client()
        .await
        .update_routes(UpdateRoutesRequest {
            instance_id: "alb-reg".into(),
            routes: vec![contract_route("late", "late.example.test", "/", "api")],
            replace_all: false,
        })
        .await
        .expect("UpdateRoutes");
    nlb.eventually("the NLB lists the late route", || {
        let mut n = n.clone();
        async move {
            let i = n
                .get_module_info(GetModuleInfoRequest {
                    instance_id: "alb-reg".into(),
                })
                .await
                .ok()?
                .into_inner();
            i.routes.iter().any(|r| r.route_id == "late").then_some(())
        }
    })
    .await;
    // And it serves.
    assert_eq!(
        lands(&sb, &alb, "late.example.test", "/anything")
            .await
            .as_deref(),
        Some("api")
    );
}

/// A route with several hosts (`hosts: [a, b]`, which the ALB's config
/// allows) must not keep the ALB from registering.
#[tokio::test(flavor = "multi_thread")]
async fn a_route_with_several_hosts_registers() {
    let sb = Sandbox::new();
    let api = origin::start("api").await;
    let (nlb, _alb) = stack(
        &sb,
        "alb-hosts",
        json!({
            "routes": [{"id": "api", "hosts": ["api.example.test", "*.api.example.test"],
                        "cluster": "api"}],
            "clusters": [cluster("api", &[&api])],
        }),
    )
    .await;
    let info = nlb
        .client()
        .await
        .get_module_info(GetModuleInfoRequest {
            instance_id: "alb-hosts".into(),
        })
        .await
        .expect("alb-hosts is registered")
        .into_inner();
    assert!(!info.routes.is_empty(), "{info:?}");
}

// ---------------------------------------------------------------------------
// 11. gRPC through the ALB

#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_streams_and_statuses_pass_through_with_trailers() {
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest as Check;
    use tonic_health::ServingStatus;

    let sb = Sandbox::new();
    // A real tonic server: grpc.health.v1.Health (unary Check, streaming Watch).
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("switchyard.Test", ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let (_nlb, alb) = stack(
        &sb,
        "alb-grpc",
        json!({
            "routes": [{"id": "grpc", "path": {"prefix": "/grpc.health.v1.Health/"}, "cluster": "grpc"}],
            "clusters": [{"name": "grpc", "endpoints": [{"address": grpc_addr.to_string()}],
                          "protocol": "http2"}],
        }),
    )
    .await;
    let connect = |addr: String| async move {
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(CALL_DEADLINE)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        HealthClient::new(ch)
    };
    let mut direct = connect(grpc_addr.to_string()).await;
    let mut via = connect(alb.data_addr.clone()).await;
    let check = |service: &str| Check {
        service: service.to_string(),
    };

    // Unary: the answer, and grpc-status 0 from the trailers (tonic merges
    // trailers into the response metadata), as a direct call gets them.
    let d = direct
        .check(check("switchyard.Test"))
        .await
        .expect("direct Check");
    let r = tokio::time::timeout(CALL_DEADLINE, via.check(check("switchyard.Test")))
        .await
        .expect("Check through the ALB within the deadline")
        .unwrap_or_else(|s| panic!("Check through the ALB: {s:?}\n{}", alb.stderr()));
    assert_eq!(r.get_ref().status, Wire::Serving as i32);
    assert_eq!(
        d.metadata().get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0"),
        "control: a direct call's trailers"
    );
    assert_eq!(
        r.metadata().get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0"),
        "the trailers did not come through: {:?}",
        r.metadata()
    );
    assert!(
        r.metadata().get("x-request-id").is_some(),
        "{:?}",
        r.metadata()
    );

    // An error status passes through with its code and message.
    let err = via
        .check(check("no.such.Service"))
        .await
        .expect_err("an unknown service");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "service not registered");

    // Server streaming: each message arrives as it is sent.
    let mut stream = via
        .watch(check("switchyard.Test"))
        .await
        .expect("Watch through the ALB")
        .into_inner();
    let first = tokio::time::timeout(CALL_DEADLINE, stream.message())
        .await
        .expect("the first Watch message within the deadline")
        .expect("a Watch message")
        .expect("the stream is open");
    assert_eq!(first.status, Wire::Serving as i32);
    reporter
        .set_service_status("switchyard.Test", ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(CALL_DEADLINE, stream.message())
        .await
        .expect("the change streamed through within the deadline")
        .expect("a Watch message")
        .expect("the stream is open");
    assert_eq!(second.status, Wire::NotServing as i32);
    drop(stream);

    let m = alb.metrics().await;
    assert!(
        e2e::metric_value(&m, r#"alb_requests_total{class="2xx",route="grpc"}"#)
            .is_some_and(|n| n >= 3.0),
        "{m}"
    );
    server.abort();
}
