//! More of the ALB (`alb`) end to end, next to `alb.rs`: TLS to origins
//! that require a client certificate, the client address from a PROXY v2
//! header, certificates reloaded from disk without a restart, the access
//! log, the retry budget, and upstream connection pooling.
//!
//! As in `alb.rs`: the real binary registered with a real NLB, real clients
//! (curl, or raw bytes where the NLB would write them), in-test origins that
//! say what they saw. Nothing asserts on how long anything took; waits are
//! bounded polls.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use e2e::alb::{
    cluster, curl, curl_stdout, seen, stack, start_alb, start_alb_with_sdk, start_nlb, AlbLaunch,
    AlbProcess,
};
use e2e::origin::{self, Origin};
use e2e::pki::Pki;
use e2e::{free_addr, NlbProcess, Sandbox, CALL_DEADLINE};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shared_types::proxy_v2::{self, Header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------
// Helpers

/// The SHA-256 of the first certificate in a PEM text, hex.
fn pem_fingerprint(pem: &str) -> String {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate in the PEM text")
        .expect("valid PEM");
    hex::encode(Sha256::digest(der.as_ref()))
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Writes `text` to `path` the way a certificate manager does: a new file
/// renamed over the old one, so a reader never sees half of it.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write the new file");
    std::fs::rename(&tmp, path).expect("rename it into place");
}

/// A CA named `ca_name` and a server certificate it signed for `names`:
/// (CA PEM, certificate PEM, key PEM).
fn issue(ca_name: &str, names: &[&str]) -> (String, String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let key = KeyPair::generate().expect("key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca).expect("signed certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// An HTTP/1.1 response read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    body: Vec<u8>,
}

impl RawResponse {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "the body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Connects to `addr`, writes `bytes` (a request with `Connection: close`,
/// perhaps after a PROXY v2 header) and reads the response to the end.
async fn raw_exchange(addr: &str, bytes: &[u8]) -> RawResponse {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(bytes).await.expect("write the request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read the response");
        raw
    };
    let raw = tokio::time::timeout(CALL_DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| panic!("no response from {addr} within {CALL_DEADLINE:?}"));
    parse_response(&raw)
}

/// Splits an HTTP/1.1 response into status and body (chunked or not).
fn parse_response(raw: &[u8]) -> RawResponse {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let mut rest = &raw[end + 4..];
    let body = if chunked {
        let mut body = Vec::new();
        loop {
            let line_end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a chunk size line");
            let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("a chunk size: {size_text:?}"));
            rest = &rest[line_end + 2..];
            if size == 0 {
                break body;
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    } else {
        rest.to_vec()
    };
    RawResponse { status, body }
}

/// `n` sequential GETs of `<url>[1-n]` on one keep-alive client connection
/// (a curl URL glob): the status of each.
async fn statuses(alb: &AlbProcess, prefix: &str, n: usize) -> Vec<u16> {
    let glob = format!("{}[1-{n}]", alb.url(prefix));
    let out = curl_stdout(&["-o", "/dev/null", "-w", "%{http_code}\\n", &glob]).await;
    let codes: Vec<u16> = out
        .lines()
        .map(|l| l.trim().parse().expect("a status code"))
        .collect();
    assert_eq!(codes.len(), n, "{n} answers for {glob}: {out}");
    codes
}

// ---------------------------------------------------------------------------
// In-test origins

/// A TLS origin that requires a client certificate from the given CA, and
/// answers every request with JSON naming the path and the SHA-256 of the
/// client certificate it was shown.
struct MtlsOrigin {
    addr: SocketAddr,
    /// TLS handshakes that failed (no client certificate, ...).
    refused: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for MtlsOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_mtls_origin(pki: &Pki) -> MtlsOrigin {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(pki.ca.as_bytes()) {
        roots.add(ca.expect("CA PEM")).expect("a usable CA");
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), ring())
            .build()
            .expect("a client certificate verifier");
    let chain = CertificateDer::pem_slice_iter(pki.server_cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("server certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(pki.server_key.as_bytes()).expect("server key PEM");
    let mut config = rustls::ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("the origin's server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let refused = Arc::new(AtomicUsize::new(0));
    let failed = refused.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, failed) = (acceptor.clone(), failed.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(stream).await {
                    Ok(tls) => tls,
                    Err(_) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                };
                let client_cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| hex::encode(Sha256::digest(c.as_ref())));
                let svc = service_fn(move |req: Request<Incoming>| {
                    let doc = json!({
                        "origin": "mtls",
                        "path": req.uri().path(),
                        "client_cert_sha256": client_cert,
                    });
                    async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(doc.to_string()))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    MtlsOrigin {
        addr,
        refused,
        task,
    }
}

/// A plaintext HTTP/1.1 origin that counts the TCP connections it accepted
/// and those still open; it answers with JSON naming the connection (its
/// number, from 1) that carried the request.
struct CountingOrigin {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for CountingOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingOrigin {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

async fn start_counting_origin() -> CountingOrigin {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let (acc, opn) = (accepted.clone(), open.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let conn = acc.fetch_add(1, Ordering::SeqCst) + 1;
            opn.fetch_add(1, Ordering::SeqCst);
            let opn = opn.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| async move {
                    let doc = json!({"conn": conn});
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(doc.to_string()))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                opn.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    CountingOrigin {
        addr,
        accepted,
        open,
        task,
    }
}

// ---------------------------------------------------------------------------
// 1. Upstream TLS with a client certificate

/// Three clusters on one origin that requires a client certificate: with
/// the certificate, without it, and with a CA that does not vouch for the
/// origin. `alpn`: the clusters' `tls.alpn`, or the default when `None`.
async fn mutual_tls_through_the_alb(id: &str, alpn: Option<Value>) {
    let sb = Sandbox::new();
    let pki = Pki::generate(&["origin.internal"]);
    let files = pki.write(sb.path());
    let other_dir = sb.path().join("other-ca");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = Pki::generate(&["origin.internal"]).write(&other_dir);
    let origin = start_mtls_origin(&pki).await;
    let endpoint = origin.addr.to_string();
    let mut clusters = json!([
        {"name": "mtls", "endpoints": [{"address": endpoint}],
         "tls": {"ca_file": files.ca, "cert_file": files.client_cert,
                 "key_file": files.client_key, "server_name": "origin.internal"}},
        {"name": "nocert", "endpoints": [{"address": endpoint}],
         "tls": {"ca_file": files.ca, "server_name": "origin.internal"}},
        {"name": "wrongca", "endpoints": [{"address": endpoint}],
         "tls": {"ca_file": other.ca, "cert_file": files.client_cert,
                 "key_file": files.client_key, "server_name": "origin.internal"}},
    ]);
    if let Some(alpn) = alpn {
        for c in clusters.as_array_mut().unwrap() {
            c["tls"]["alpn"] = alpn.clone();
        }
    }
    let (_nlb, alb) = stack(
        &sb,
        id,
        json!({
            "routes": [
                {"id": "mtls", "path": {"prefix": "/mtls/"}, "cluster": "mtls"},
                {"id": "nocert", "path": {"prefix": "/nocert/"}, "cluster": "nocert"},
                {"id": "wrongca", "path": {"prefix": "/wrongca/"}, "cluster": "wrongca"},
            ],
            "clusters": clusters,
        }),
    )
    .await;

    // Through the ALB over TLS, the origin saw the ALB's client certificate.
    for i in 0..3 {
        let path = format!("/mtls/{i}");
        let r = curl(sb.path(), &[&alb.url(&path)]).await;
        assert_eq!(r.status, 200, "{r:?}\nALB stderr:\n{}", alb.stderr());
        let j = r.json();
        assert_eq!(j["origin"], "mtls", "{j}");
        assert_eq!(j["path"], path.as_str(), "{j}");
        assert_eq!(
            j["client_cert_sha256"].as_str(),
            Some(pem_fingerprint(&pki.client_cert).as_str()),
            "the origin was shown another client certificate: {j}"
        );
    }
    assert_eq!(origin.refused.load(Ordering::SeqCst), 0);

    // Without the client certificate the origin refuses the handshake: a
    // 502 naming the cluster and the endpoint.
    let r = curl(sb.path(), &[&alb.url("/nocert/x")]).await;
    assert_eq!(r.status, 502, "{r:?}");
    let body = r.text();
    assert!(
        body.contains("nocert") && body.contains(&endpoint),
        "the 502 does not name the cluster and endpoint: {body:?}"
    );
    assert!(
        body.contains("CertificateRequired"),
        "the 502 does not say the origin wanted a client certificate: {body:?}"
    );
    assert!(
        origin.refused.load(Ordering::SeqCst) >= 1,
        "the origin saw no refused handshake"
    );

    // An origin whose certificate the cluster's CA does not vouch for: the
    // ALB refuses it (a connect failure, nothing was sent).
    let r = curl(sb.path(), &[&alb.url("/wrongca/x")]).await;
    assert_eq!(r.status, 502, "{r:?}");
    let body = r.text();
    assert!(
        body.contains("could not connect")
            && body.contains("wrongca")
            && body.contains(&endpoint)
            && body.contains("certificate"),
        "the 502 does not say the origin's certificate was refused: {body:?}"
    );

    // And the good cluster still works after both failures.
    let r = curl(sb.path(), &[&alb.url("/mtls/again")]).await;
    assert_eq!(r.status, 200, "{r:?}");
}

/// The clusters as docs/alb.md shows them: `tls` without `alpn` (the
/// default offers `http/1.1`).
#[tokio::test(flavor = "multi_thread")]
async fn upstream_mutual_tls_with_the_default_alpn() {
    mutual_tls_through_the_alb("alb-mtls-default", None).await;
}

/// The same with `alpn: []`, which gets past the panic above (hyper-rustls
/// then offers no ALPN for an HTTP/1.1 cluster).
#[tokio::test(flavor = "multi_thread")]
async fn upstream_mutual_tls_presents_the_client_certificate_and_502s_without_it() {
    mutual_tls_through_the_alb("alb-mtls", Some(json!([]))).await;
}

// ---------------------------------------------------------------------------
// 2. The client address from a PROXY v2 header

fn proxied_get(src: SocketAddr, dst: SocketAddr, host: &str, path: &str) -> Vec<u8> {
    let mut bytes = proxy_v2::encode(&Header::proxy(src, dst)).expect("encode the header");
    bytes.extend_from_slice(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    bytes
}

async fn proxy_protocol_stack(sb: &Sandbox, id: &str, web: &Origin) -> (NlbProcess, AlbProcess) {
    let nlb = start_nlb(sb).await;
    let alb = start_alb_with_sdk(
        sb.path(),
        &nlb.grpc_addr,
        &AlbLaunch::new(
            id,
            json!({
                "routes": [{"id": "all", "cluster": "web"}],
                "clusters": [cluster("web", &[web])],
            }),
        ),
        &json!({"data": {"proxy_protocol": true, "proxy_header_timeout_ms": 1000}}),
    )
    .await;
    (nlb, alb)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_address_comes_from_the_proxy_v2_header() {
    let sb = Sandbox::new();
    let web = origin::start("web").await;
    let (_nlb, alb) = proxy_protocol_stack(&sb, "alb-pp", &web).await;
    let src: SocketAddr = "203.0.113.9:5555".parse().unwrap();
    let dst: SocketAddr = alb.data_addr.parse().unwrap();

    let r = raw_exchange(
        &alb.data_addr,
        &proxied_get(src, dst, "pp.example.test", "/pp/1"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}\nALB stderr:\n{}", alb.stderr());
    let j = r.json();
    assert_eq!(j["origin"], "web");
    assert_eq!(j["path"], "/pp/1");
    assert_eq!(seen(&j, "x-forwarded-for"), Some("203.0.113.9"), "{j}");
    assert_eq!(
        seen(&j, "forwarded"),
        Some("for=203.0.113.9;host=\"pp.example.test\";proto=http"),
        "{j}"
    );

    // A client's own X-Forwarded-For is kept, the PROXY source appended.
    let mut bytes = proxy_v2::encode(&Header::proxy(src, dst)).unwrap();
    bytes.extend_from_slice(
        b"GET /pp/2 HTTP/1.1\r\nHost: pp.example.test\r\nX-Forwarded-For: 198.51.100.1\r\n\
          Connection: close\r\n\r\n",
    );
    let j = raw_exchange(&alb.data_addr, &bytes).await.json();
    assert_eq!(
        seen(&j, "x-forwarded-for"),
        Some("198.51.100.1, 203.0.113.9"),
        "{j}"
    );

    // An IPv6 client: bracketed and quoted in Forwarded (RFC 7239).
    let src6: SocketAddr = "[2001:db8::9]:6666".parse().unwrap();
    let dst6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    let j = raw_exchange(
        &alb.data_addr,
        &proxied_get(src6, dst6, "pp.example.test", "/pp/6"),
    )
    .await
    .json();
    assert_eq!(seen(&j, "x-forwarded-for"), Some("2001:db8::9"), "{j}");
    assert_eq!(
        seen(&j, "forwarded"),
        Some("for=\"[2001:db8::9]\";host=\"pp.example.test\";proto=http"),
        "{j}"
    );

    // The access log names the client the header gave, with its port.
    alb.eventually("the access log names 203.0.113.9:5555", || async {
        let log = alb.stderr();
        log.lines()
            .any(|l| {
                l.contains("access") && l.contains("client=203.0.113.9:5555") && l.contains("/pp/1")
            })
            .then_some(())
    })
    .await;
    assert!(
        alb.stderr()
            .lines()
            .any(|l| l.contains("access") && l.contains("client=[2001:db8::9]:6666")),
        "{}",
        alb.stderr()
    );

    // Without a header the connection is refused: no answer at all, and
    // the origin never hears of it.
    let hits = web.hits();
    let r = curl(sb.path(), &[&alb.url("/no-header")]).await;
    assert!(r.exit != 0 && r.status == 0, "{r:?}");
    assert_eq!(web.hits(), hits);
    let refused = alb
        .metric(r#"module_refused_connections_total{reason="proxy_header"}"#)
        .await;
    assert_eq!(refused, 1.0);
}

/// The NLB relays an IPv4 client to an IPv6 destination as an IPv4-mapped
/// IPv6 source (`::ffff:a.b.c.d`, `Header::proxy` does it the same way):
/// the client is still 203.0.113.9 to the origin.
#[tokio::test(flavor = "multi_thread")]
async fn an_ipv4_client_relayed_as_ipv4_mapped_ipv6_is_forwarded_as_ipv4() {
    let sb = Sandbox::new();
    let web = origin::start("web").await;
    let (_nlb, alb) = proxy_protocol_stack(&sb, "alb-pp-mapped", &web).await;
    let src: SocketAddr = "203.0.113.9:5555".parse().unwrap();
    let dst: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    let j = raw_exchange(
        &alb.data_addr,
        &proxied_get(src, dst, "pp.example.test", "/mapped"),
    )
    .await
    .json();
    assert_eq!(seen(&j, "x-forwarded-for"), Some("203.0.113.9"), "{j}");
    assert_eq!(
        seen(&j, "forwarded"),
        Some("for=203.0.113.9;host=\"pp.example.test\";proto=http"),
        "{j}"
    );
}

// ---------------------------------------------------------------------------
// 3. Certificates reloaded without a restart

#[tokio::test(flavor = "multi_thread")]
async fn certificates_are_reloaded_from_disk_and_a_broken_file_keeps_the_last_good_one() {
    let sb = Sandbox::new();
    let web = origin::start("web").await;
    let dir = sb.path().join("certs");
    std::fs::create_dir_all(&dir).unwrap();
    let a_cert = dir.join("a.pem");
    let a_key = dir.join("a.key");
    let b_cert = dir.join("b.pem");
    let b_key = dir.join("b.key");
    let write_ca = |name: &str, pem: &str| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let (ca1, cert1, key1) = issue("Reload CA 1", &["a.example.test"]);
    let (ca_b, cert_b, key_b) = issue("Reload CA b", &["b.example.test"]);
    let ca1 = write_ca("ca1.pem", &ca1);
    let ca_b = write_ca("ca-b.pem", &ca_b);
    replace_file(&a_cert, &cert1);
    replace_file(&a_key, &key1);
    replace_file(&b_cert, &cert_b);
    replace_file(&b_key, &key_b);
    let (_nlb, mut alb) = stack(
        &sb,
        "alb-reload",
        json!({
            "routes": [{"id": "all", "cluster": "web"}],
            "clusters": [cluster("web", &[&web])],
            "tls": {
                "certificates": [
                    {"cert_file": a_cert, "key_file": a_key},
                    {"cert_file": b_cert, "key_file": b_key},
                ],
                "reload_interval_seconds": 1,
            },
        }),
    )
    .await;
    let config_before = std::fs::read(&alb.config_path).unwrap();
    let port = alb.data_port();
    let https = |name: &'static str, ca: PathBuf| {
        let dir = sb.path().to_path_buf();
        async move {
            let resolve = format!("{name}:{port}:127.0.0.1");
            let url = format!("https://{name}:{port}/tls");
            let ca = ca.display().to_string();
            curl(
                &dir,
                &[
                    "-v",
                    "--http1.1",
                    "--cacert",
                    &ca,
                    "--resolve",
                    &resolve,
                    &url,
                ],
            )
            .await
        }
    };
    // Served by `issuer`, verified against `ca`, and the request went through.
    let served_by = |r: &e2e::alb::CurlResponse, issuer: &str| {
        r.exit == 0
            && r.status == 200
            && r.ssl_verify_result == 0
            && r.stderr.contains(&format!("issuer: CN={issuer}"))
    };

    let r = https("a.example.test", ca1.clone()).await;
    assert!(served_by(&r, "Reload CA 1"), "{r:?}");
    let r = https("b.example.test", ca_b.clone()).await;
    assert!(served_by(&r, "Reload CA b"), "{r:?}");

    // A new certificate for a.example.test, from another CA, written over
    // the old files: served without a restart or a reload.
    let (ca2, cert2, key2) = issue("Reload CA 2", &["a.example.test"]);
    let ca2 = write_ca("ca2.pem", &ca2);
    let r = https("a.example.test", ca2.clone()).await;
    assert!(r.exit != 0, "the CA 2 verified before the change: {r:?}");
    replace_file(&a_cert, &cert2);
    replace_file(&a_key, &key2);
    alb.eventually("the new certificate for a.example.test is served", || {
        let https = &https;
        let ca2 = ca2.clone();
        async move {
            let r = https("a.example.test", ca2).await;
            served_by(&r, "Reload CA 2").then_some(())
        }
    })
    .await;
    let r = https("a.example.test", ca1.clone()).await;
    assert!(
        r.exit != 0 && r.status == 0,
        "the old certificate is still served: {r:?}"
    );
    let r = https("b.example.test", ca_b.clone()).await;
    assert!(served_by(&r, "Reload CA b"), "b changed with a: {r:?}");

    // A broken key written later: the reload fails, loudly, and the last
    // good certificate stays.
    let complaints = |log: &str| log.matches("cannot be loaded").count();
    let before = complaints(&alb.stderr());
    replace_file(
        &a_key,
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    );
    alb.eventually(
        "the ALB says the changed files cannot be loaded",
        || async {
            let log = alb.stderr();
            (complaints(&log) > before).then_some(log)
        },
    )
    .await;
    let log = alb.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("cannot be loaded") && l.contains(&a_key.display().to_string())),
        "the warning does not name the broken file:\n{log}"
    );
    for _ in 0..3 {
        let r = https("a.example.test", ca2.clone()).await;
        assert!(
            served_by(&r, "Reload CA 2"),
            "the last good certificate is gone: {r:?}"
        );
    }
    let r = https("b.example.test", ca_b.clone()).await;
    assert!(served_by(&r, "Reload CA b"), "{r:?}");
    // Counted: at least the one good reload and the failed one.
    let m = alb.metrics().await;
    let count = |r: &str| {
        e2e::metric_value(&m, &format!("alb_tls_reloads_total{{result=\"{r}\"}}")).unwrap_or(0.0)
    };
    assert!(count("ok") >= 1.0 && count("failed") >= 1.0, "{m}");

    // Fixed files are picked up again.
    let (ca3, cert3, key3) = issue("Reload CA 3", &["a.example.test"]);
    let ca3 = write_ca("ca3.pem", &ca3);
    replace_file(&a_cert, &cert3);
    replace_file(&a_key, &key3);
    alb.eventually("the fixed certificate is served", || {
        let https = &https;
        let ca3 = ca3.clone();
        async move {
            let r = https("a.example.test", ca3).await;
            served_by(&r, "Reload CA 3").then_some(())
        }
    })
    .await;

    // All of it without a restart and with the config file untouched.
    assert!(alb.try_exit().is_none(), "the ALB exited");
    assert_eq!(std::fs::read(&alb.config_path).unwrap(), config_before);
    let r = curl(sb.path(), &[&alb.url("/plain")]).await;
    assert_eq!(r.status, 200, "{r:?}");
}

// ---------------------------------------------------------------------------
// 4. Access log

/// The access log lines (JSON) in a log.
fn access_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .map(|v| v["fields"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_access_log_has_one_line_per_request_with_its_fields() {
    let sb = Sandbox::new();
    let web = origin::start("web").await;
    let live = origin::start("live").await;
    let dead = free_addr();
    let nlb = start_nlb(&sb).await;
    let module = json!({
        "routes": [
            {"id": "app", "hosts": ["app.example.test"], "cluster": "web"},
            {"id": "flaky", "hosts": ["flaky.example.test"], "cluster": "flaky"},
        ],
        "clusters": [
            cluster("web", &[&web]),
            {"name": "flaky", "balance": "round_robin",
             "endpoints": [{"address": dead}, {"address": live.addr.to_string()}]},
        ],
    });
    let mut launch = AlbLaunch::new("alb-access", module.clone());
    launch.env.push(("MODULE_LOG_FORMAT".into(), "json".into()));
    let alb = start_alb(sb.path(), &nlb.grpc_addr, &launch).await;

    let host = |h: &str| format!("Host: {h}");
    let r = curl(
        sb.path(),
        &["-H", &host("app.example.test"), &alb.url("/a/1?q=2")],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = curl(
        sb.path(),
        &[
            "-X",
            "POST",
            "-d",
            "x=1",
            "-H",
            &host("app.example.test"),
            &alb.url("/a/post"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = curl(
        sb.path(),
        &["-H", &host("nowhere.example.test"), &alb.url("/lost")],
    )
    .await;
    assert_eq!(r.status, 404, "{r:?}");
    for i in 0..4 {
        let r = curl(
            sb.path(),
            &[
                "-H",
                &host("flaky.example.test"),
                &alb.url(&format!("/f/{i}")),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    let lines = alb
        .eventually("seven access log lines", || async {
            let lines = access_lines(&alb.stderr());
            (lines.len() >= 7).then_some(lines)
        })
        .await;
    assert_eq!(lines.len(), 7, "one line per request: {lines:#?}");
    for l in &lines {
        let client: SocketAddr = l["client"]
            .as_str()
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no client address: {l}"));
        assert_eq!(client.ip().to_string(), "127.0.0.1", "{l}");
        let ms = l["duration_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("no duration_ms: {l}"));
        assert!(ms >= 0.0, "{l}");
    }
    let by_path = |p: &str| {
        lines
            .iter()
            .find(|l| l["path"] == p)
            .unwrap_or_else(|| panic!("no access log line for {p}: {lines:#?}"))
    };
    let web_addr = web.addr.to_string();
    let l = by_path("/a/1");
    assert_eq!(l["method"], "GET", "{l}");
    assert_eq!(l["host"], "app.example.test", "{l}");
    assert_eq!(l["status"], 200, "{l}");
    assert_eq!(l["route"], "app", "{l}");
    assert_eq!(l["cluster"], "web", "{l}");
    assert_eq!(l["endpoint"], web_addr.as_str(), "{l}");
    assert_eq!(l["attempts"], 1, "{l}");
    let l = by_path("/a/post");
    assert_eq!(
        (&l["method"], &l["status"], &l["route"]),
        (&json!("POST"), &json!(200), &json!("app")),
        "{l}"
    );
    let l = by_path("/lost");
    assert_eq!(l["method"], "GET", "{l}");
    assert_eq!(l["host"], "nowhere.example.test", "{l}");
    assert_eq!(l["status"], 404, "{l}");
    assert_eq!(l["route"], "-", "{l}");
    assert_eq!(l["cluster"], "-", "{l}");
    assert_eq!(l["endpoint"], "-", "{l}");
    assert_eq!(l["attempts"], 0, "{l}");
    // Over the flaky cluster every request ended on the live endpoint;
    // those that tried the dead one first say 2 attempts.
    let live_addr = live.addr.to_string();
    let flaky: Vec<&Value> = lines.iter().filter(|l| l["route"] == "flaky").collect();
    assert_eq!(flaky.len(), 4, "{lines:#?}");
    for l in &flaky {
        assert_eq!(l["cluster"], "flaky", "{l}");
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["endpoint"], live_addr.as_str(), "{l}");
        assert!(l["attempts"] == 1 || l["attempts"] == 2, "{l}");
    }
    let retried = flaky.iter().filter(|l| l["attempts"] == 2).count();
    let retries = alb.metric(r#"alb_retries_total{cluster="flaky"}"#).await;
    assert!(
        retried >= 1,
        "round robin never tried the dead endpoint first"
    );
    assert_eq!(retried as f64, retries, "{flaky:#?}");

    // access_log: false writes none.
    let mut module = module;
    module["access_log"] = json!(false);
    let mut launch = AlbLaunch::new("alb-quiet", module);
    launch.env.push(("MODULE_LOG_FORMAT".into(), "json".into()));
    let quiet = start_alb(sb.path(), &nlb.grpc_addr, &launch).await;
    for path in ["/a/1", "/a/2"] {
        let r = curl(
            sb.path(),
            &["-H", &host("app.example.test"), &quiet.url(path)],
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = curl(sb.path(), &["-H", &host("x.test"), &quiet.url("/lost")]).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(
        quiet
            .metric(r#"alb_requests_total{class="2xx",route="app"}"#)
            .await,
        2.0
    );
    let log = quiet.stderr();
    assert!(
        !log.is_empty() && access_lines(&log).is_empty(),
        "access log lines with access_log: false:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// 5. Retry budget

/// Half the requests meet a dead endpoint first (round robin over a dead
/// and a live one, ejection off). With `budget_percent: 0` the budget is
/// the floor alone: `min_retries_per_second` × 10 retries in a 10 s window.
/// Once it is spent the dead endpoint's failures reach the client as 502s.
#[tokio::test(flavor = "multi_thread")]
async fn retries_stop_when_the_retry_budget_is_spent() {
    let sb = Sandbox::new();
    let live = origin::start("live").await;
    let dead = free_addr();
    let flaky = |name: &str, min_per_second: u32| {
        json!({
            "name": name,
            "balance": "round_robin",
            "endpoints": [{"address": dead}, {"address": live.addr.to_string()}],
            "retry": {"attempts": 2, "budget_percent": 0, "min_retries_per_second": min_per_second},
            // Never eject: every request keeps meeting the dead endpoint.
            "outlier": {"max_ejection_percent": 0},
        })
    };
    let (_nlb, alb) = stack(
        &sb,
        "alb-budget",
        json!({
            "routes": [
                {"id": "floor", "path": {"prefix": "/floor/"}, "cluster": "floor"},
                {"id": "none", "path": {"prefix": "/none/"}, "cluster": "none"},
            ],
            "clusters": [flaky("floor", 1), flaky("none", 0)],
        }),
    )
    .await;

    let n = 80;
    let started = Instant::now();
    let codes = statuses(&alb, "/floor/", n).await;
    let elapsed = started.elapsed();
    let m = alb.metrics().await;
    let v = |s: &str| e2e::metric_value(&m, s).unwrap_or(0.0);
    let retries = v(r#"alb_retries_total{cluster="floor"}"#) as usize;
    let connects = v(r#"alb_upstream_errors_total{cluster="floor",kind="connect"}"#) as usize;
    let failed = codes.iter().filter(|c| **c == 502).count();
    let ok = codes.iter().filter(|c| **c == 200).count();
    assert_eq!(ok + failed, n, "only 200s and 502s: {codes:?}");
    // Every connect failure was retried (on the live endpoint) or answered.
    assert_eq!(connects, retries + failed, "{codes:?}\n{m}");
    assert!(
        connects >= n / 4,
        "round robin sent too few requests to the dead endpoint first: {connects}\n{m}"
    );
    if elapsed.as_secs_f64() < 9.0 {
        // All in one window: exactly the floor of 1/s × 10 s.
        assert_eq!(retries, 10, "{codes:?}\n{m}");
    } else {
        // A slow machine: at most one more window's worth.
        assert!(
            (10..=10 * (elapsed.as_secs() as usize / 9 + 1)).contains(&retries),
            "{retries} retries in {elapsed:?}\n{m}"
        );
    }
    // The budget went to the first failures: no 502 before ten retried
    // requests had succeeded.
    let first_failure = codes.iter().position(|c| *c == 502).expect("a 502");
    assert!(first_failure >= 10, "{codes:?}");

    // A spent budget: the client gets the dead endpoint's failure.
    let body = alb
        .eventually("a 502 from the dead endpoint", || async {
            let r = curl(sb.path(), &[&alb.url("/floor/more")]).await;
            (r.status == 502).then(|| r.text())
        })
        .await;
    assert!(
        body.contains("could not connect") && body.contains(&dead),
        "{body:?}"
    );

    // No budget at all: never a retry.
    let codes = statuses(&alb, "/none/", 20).await;
    let m = alb.metrics().await;
    let v = |s: &str| e2e::metric_value(&m, s).unwrap_or(0.0);
    let connects = v(r#"alb_upstream_errors_total{cluster="none",kind="connect"}"#) as usize;
    assert_eq!(v(r#"alb_retries_total{cluster="none"}"#), 0.0, "{m}");
    assert!(connects >= 5, "{codes:?}\n{m}");
    assert_eq!(
        codes.iter().filter(|c| **c == 502).count(),
        connects,
        "{codes:?}"
    );
}

// ---------------------------------------------------------------------------
// 6. Upstream connection pooling

#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_pooled_and_closed_when_idle() {
    let sb = Sandbox::new();
    let pooled = start_counting_origin().await;
    let unpooled = start_counting_origin().await;
    let short = start_counting_origin().await;
    let (_nlb, alb) = stack(
        &sb,
        "alb-pool",
        json!({
            "routes": [
                {"id": "pooled", "path": {"prefix": "/pooled/"}, "cluster": "pooled"},
                {"id": "unpooled", "path": {"prefix": "/unpooled/"}, "cluster": "unpooled"},
                {"id": "short", "path": {"prefix": "/short/"}, "cluster": "short"},
            ],
            "clusters": [
                {"name": "pooled", "endpoints": [{"address": pooled.addr.to_string()}]},
                {"name": "unpooled", "endpoints": [{"address": unpooled.addr.to_string()}],
                 "max_idle_per_endpoint": 0},
                {"name": "short", "endpoints": [{"address": short.addr.to_string()}],
                 "idle_timeout_ms": 300},
            ],
        }),
    )
    .await;

    // 100 requests one after another on one client connection.
    let codes = statuses(&alb, "/pooled/", 100).await;
    assert_eq!(codes, vec![200; 100]);
    let after_one_client = pooled.accepted();
    assert!(
        (1..=10).contains(&after_one_client),
        "100 sequential requests took {after_one_client} upstream connections"
    );
    // 20 more clients, one request each: the pool serves them too.
    for i in 0..20 {
        let r = curl(sb.path(), &[&alb.url(&format!("/pooled/c{i}"))]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let total = pooled.accepted();
    assert!(
        total <= after_one_client + 4,
        "20 clients added {} upstream connections",
        total - after_one_client
    );
    assert!(pooled.open() >= 1, "no pooled connection stayed open");

    // max_idle_per_endpoint: 0 keeps none: a connection per request.
    let codes = statuses(&alb, "/unpooled/", 30).await;
    assert_eq!(codes, vec![200; 30]);
    assert_eq!(unpooled.accepted(), 30);
    alb.eventually("the unpooled connections are closed", || async {
        (unpooled.open() == 0).then_some(())
    })
    .await;

    // idle_timeout_ms: an idle pooled connection is closed, and the next
    // request opens a new one.
    let r = curl(sb.path(), &[&alb.url("/short/1")]).await;
    assert_eq!((r.status, r.json()["conn"].as_u64()), (200, Some(1)));
    alb.eventually("the idle connection is closed", || async {
        (short.open() == 0).then_some(())
    })
    .await;
    assert_eq!(short.accepted(), 1);
    let r = curl(sb.path(), &[&alb.url("/short/2")]).await;
    assert_eq!((r.status, r.json()["conn"].as_u64()), (200, Some(2)));
    // The 90 s default kept the other pool's connection all along.
    assert!(pooled.open() >= 1);
}
