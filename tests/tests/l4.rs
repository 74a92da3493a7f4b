//! The NLB's L4 data plane through the real binary: each sniffed protocol
//! reaches the module registered for it (bytes captured from real clients,
//! and curl itself), a declared listener routes without reading, static
//! backend pools share and survive a closed backend, a 10% version weight
//! takes 10% of connections, sticky sources keep their version while the
//! canary's weight rises, and the data-plane metrics and
//! `GetLoadDistribution` follow the traffic.
//!
//! Module instances are fake: in-test TCP servers that register over the
//! control API and answer each connection with a banner naming themselves
//! (see `e2e::l4`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use e2e::l4::{
    self, banner_from, connect_from, exchange, hold, metric_sum, metrics_until, register, route,
    run_bounded, source, start_nlb, tally, Behaviour, DataServer, L4Nlb, ModuleSpec,
};
use e2e::{poll_until, Sandbox};
use shared_types::pb::{ModuleType, Protocol};
use shared_types::sniff::{self, Verdict};

/// Connections at once in the loads below.
const PARALLEL: usize = 32;
/// Time a whole load may take (they take seconds; the machine may be busy).
const LOAD_DEADLINE: Duration = Duration::from_secs(300);

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../shared-types/tests/fixtures/sniff/{name}.bin",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every fixture, the instance it must reach on the `auto` listener of
/// [`each_sniffed_protocol_reaches_the_module_registered_for_it`], and the
/// protocol family the NLB counts it as.
const FIXTURES: &[(&str, &str, &str)] = &[
    // SNI switchyard.test: the exact-name route beats the wildcard and the
    // route for another name.
    ("curl-https-sni", "tls-exact", "tls"),
    ("tls-hello-split-records", "tls-exact", "tls"),
    // SNI openssl.switchyard.test: only the wildcard matches.
    ("openssl-s_client-sni", "tls-wildcard", "tls"),
    // Host switchyard.test:39933: the route naming the host beats the
    // route for any host.
    ("curl-http1", "http-host", "http1"),
    // Host [::1]:38615: only the route for any host matches.
    ("curl-http1-ipv6", "http-any", "http1"),
    ("curl-h2c-prior-knowledge", "h2", "http2"),
    ("psql-startup", "postgres", "postgres"),
    ("psql-sslrequest", "postgres", "postgres"),
    ("psql-gssenc", "postgres", "postgres"),
    ("psql-cancel", "postgres", "postgres"),
    ("redis-cli-resp", "redis", "redis"),
    ("redis-inline", "redis", "redis"),
    ("pymongo-hello", "mongodb", "mongodb"),
    ("ffmpeg-rtmp-publish", "rtmp", "rtmp"),
];

/// Config sections: a static pool `web` of `addrs`, and a route to it for
/// `protocol` connections to `port`.
fn web_pool(addrs: &[String], protocol: &str, port: u16) -> String {
    let list = addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "backends:\n  web: [{list}]\n\
         routes:\n  - {{route_id: web, protocol: {protocol}, destination_port: {port}, metadata: {{backend: web}}}}\n"
    )
}

/// `bytes` in three pieces (as a client whose first flight spans segments).
fn thirds(bytes: &[u8]) -> Vec<&[u8]> {
    let a = bytes.len() / 3;
    let b = 2 * bytes.len() / 3;
    [&bytes[..a], &bytes[a..b], &bytes[b..]]
        .into_iter()
        .filter(|c| !c.is_empty())
        .collect()
}

/// Waits until `server` has recorded `n` finished connections (a fake
/// instance records one just after it closes, so just after the client
/// sees the end).
async fn finished(nlb: &L4Nlb, server: &DataServer, n: usize) -> Vec<Vec<u8>> {
    poll_until(
        &format!("{} finished {n} connection(s)", server.name),
        || nlb.stderr(),
        || async { Some(server.received()).filter(|r| r.len() >= n) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn each_sniffed_protocol_reaches_the_module_registered_for_it() {
    // The table covers every captured client.
    let on_disk: BTreeSet<String> = std::fs::read_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared-types/tests/fixtures/sniff"
    ))
    .expect("the fixtures directory")
    .filter_map(|e| {
        let name = e.ok()?.file_name().into_string().ok()?;
        name.strip_suffix(".bin").map(str::to_string)
    })
    .collect();
    let listed: BTreeSet<String> = FIXTURES.iter().map(|f| f.0.to_string()).collect();
    assert_eq!(on_disk, listed, "every fixture must be replayed here");

    let sb = Sandbox::new();
    let nlb = start_nlb(&sb, &[("auto", "auto")], |_| String::new()).await;
    let port = nlb.listeners.port("auto");
    let spec = |id: &str, t: ModuleType, p: Protocol, name: &str| {
        ModuleSpec::new(id, t, vec![route(id, p, port, name)])
    };
    let specs = [
        spec(
            "tls-exact",
            ModuleType::Alb,
            Protocol::Https,
            "switchyard.test",
        ),
        spec(
            "tls-wildcard",
            ModuleType::Alb,
            Protocol::Https,
            "*.switchyard.test",
        ),
        spec("tls-other", ModuleType::Alb, Protocol::Https, "other.test"),
        spec(
            "http-host",
            ModuleType::Alb,
            Protocol::Http,
            "switchyard.test",
        ),
        spec("http-any", ModuleType::Alb, Protocol::Http, ""),
        spec("h2", ModuleType::Alb, Protocol::Http2, ""),
        spec("postgres", ModuleType::Dblb, Protocol::Postgres, ""),
        spec("redis", ModuleType::Dblb, Protocol::Redis, ""),
        spec("mongodb", ModuleType::Dblb, Protocol::Mongodb, ""),
        spec("rtmp", ModuleType::Rtmp, Protocol::Rtmp, ""),
    ];
    let mut modules = BTreeMap::new();
    for s in specs {
        let m = register(&nlb, s).await;
        modules.insert(m.id.clone(), m);
    }

    // Each fixture twice: in one write, then in three with pauses between.
    let mut expected: BTreeMap<&str, Vec<Vec<u8>>> = BTreeMap::new();
    let mut per_family: BTreeMap<&str, usize> = BTreeMap::new();
    let mut n = 0;
    for (name, instance, family) in FIXTURES {
        let bytes = fixture(name);
        for split in [false, true] {
            let chunks = if split {
                thirds(&bytes)
            } else {
                vec![&bytes[..]]
            };
            let got = exchange(
                source(n),
                nlb.listeners.addr("auto"),
                &chunks,
                Duration::from_millis(30),
            )
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{name} (split: {split}): {e}; nlb stderr:\n{}",
                    nlb.stderr()
                )
            });
            n += 1;
            assert_eq!(
                got.instance, *instance,
                "{name} (split: {split}) reached the wrong instance"
            );
            assert_eq!(
                got.echoed, bytes,
                "{name} (split: {split}): the echo is not the fixture"
            );
            let sent = expected.entry(*instance).or_default();
            sent.push(bytes.clone());
            // The instance got exactly the client's bytes, the sniffed
            // ones replayed first.
            let received = finished(&nlb, &modules[*instance], sent.len()).await;
            assert_eq!(
                received.last(),
                Some(&bytes),
                "{instance} did not receive exactly {name} (split: {split})"
            );
            *per_family.entry(*family).or_default() += 1;
        }
    }
    for (id, m) in &modules {
        let want = expected.get(id.as_str()).cloned().unwrap_or_default();
        assert_eq!(m.received(), want, "what {id} received, in order");
        assert_eq!(m.accepted(), want.len(), "connections {id} accepted");
    }
    assert_eq!(modules["tls-other"].accepted(), 0);

    // Counted by listener, protocol and module type.
    let module_of = |family: &str| match family {
        "postgres" | "redis" | "mongodb" => "dblb",
        "rtmp" => "rtmp",
        _ => "alb",
    };
    let text = metrics_until(&nlb, "the connections counted", |t| {
        metric_sum(t, "nlb_connections_total", &[("listener", "auto")]) >= n as f64
    })
    .await;
    for (family, count) in &per_family {
        let labels = [
            ("listener", "auto"),
            ("protocol", *family),
            ("module", module_of(family)),
        ];
        assert_eq!(
            metric_sum(&text, "nlb_connections_total", &labels),
            *count as f64,
            "nlb_connections_total{labels:?}"
        );
        assert_eq!(
            metric_sum(
                &text,
                "nlb_sniff_total",
                &[("listener", "auto"), ("outcome", family)]
            ),
            *count as f64,
            "nlb_sniff_total for {family}"
        );
    }
    assert_eq!(
        metric_sum(&text, "nlb_connections_total", &[("listener", "auto")]),
        n as f64
    );
    assert_eq!(
        metric_sum(&text, "nlb_sniff_total", &[("listener", "auto")]),
        n as f64,
        "one sniff outcome per connection, all matches"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_reaches_the_module_its_host_names() {
    let sb = Sandbox::new();
    let nlb = start_nlb(&sb, &[("web", "auto")], |_| String::new()).await;
    let port = nlb.listeners.port("web");
    let mut modules = BTreeMap::new();
    for (id, host) in [("curl-a", "a.curl.test"), ("curl-b", "b.curl.test")] {
        let spec = ModuleSpec::new(
            id,
            ModuleType::Alb,
            vec![route(id, Protocol::Http, port, host)],
        )
        .behaviour(Behaviour::Http);
        modules.insert(host, register(&nlb, spec).await);
    }
    // Alternating hosts, from a different source address each time.
    let hosts = ["a.curl.test", "b.curl.test"];
    for i in 0..6 {
        let host = hosts[i % 2];
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("http://{host}:{port}/request-{i}");
        let from = source(i + 1000).to_string();
        let r = e2e::alb::curl(
            sb.path(),
            &[
                "--http1.1",
                "--interface",
                &from,
                "--resolve",
                &resolve,
                &url,
            ],
        )
        .await;
        assert_eq!(r.exit, 0, "curl {url}: {}", r.stderr);
        assert_eq!(r.status, 200, "curl {url}: {r:?}");
        assert_eq!(
            r.text(),
            format!("{}{}\n", l4::BANNER, modules[host].id),
            "curl {url} reached the wrong module"
        );
    }
    for (host, m) in &modules {
        let got = finished(&nlb, m, 3).await;
        assert_eq!(got.len(), 3, "requests {host} received");
        for (k, head) in got.iter().enumerate() {
            let head = String::from_utf8_lossy(head);
            assert!(
                head.contains(&format!("Host: {host}:{port}\r\n"))
                    && head.contains("User-Agent: curl/"),
                "request {k} to {host} is not curl's: {head:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declared_listener_routes_without_reading_so_the_server_speaks_first() {
    let sb = Sandbox::new();
    // A sniff would wait 30 s for a silent client: longer than the client
    // waits for its banner.
    let nlb = start_nlb(&sb, &[("auto", "auto"), ("pg", "postgres")], |_| {
        "dataplane: {sniff_timeout_ms: 30000}\n".to_string()
    })
    .await;
    let (auto, pg) = (nlb.listeners.port("auto"), nlb.listeners.port("pg"));
    let declared = register(
        &nlb,
        ModuleSpec::new(
            "pg-declared",
            ModuleType::Dblb,
            vec![route("pg-declared", Protocol::Postgres, pg, "")],
        ),
    )
    .await;
    // The same protocol on the other listener goes elsewhere: routes name
    // their port.
    let sniffed = register(
        &nlb,
        ModuleSpec::new(
            "pg-sniffed",
            ModuleType::Dblb,
            vec![route("pg-sniffed", Protocol::Postgres, auto, "")],
        ),
    )
    .await;

    // A client that sends nothing gets the server's first words.
    let (mut conn, instance) = hold(source(1), nlb.listeners.addr("pg"))
        .await
        .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", nlb.stderr()));
    assert_eq!(instance, "pg-declared");
    // Then the conversation goes on as usual.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        conn.write_all(b"hello after the banner").await.unwrap();
        conn.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(e2e::CALL_DEADLINE, conn.read_to_end(&mut rest))
            .await
            .expect("the echo within the deadline")
            .expect("read the echo");
        assert_eq!(rest, b"hello after the banner");
    }
    // A real client's bytes on the declared listener arrive as sent.
    let startup = fixture("psql-startup");
    let got = exchange(
        source(2),
        nlb.listeners.addr("pg"),
        &[&startup],
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert_eq!(got.instance, "pg-declared");
    assert_eq!(got.echoed, startup);
    let got = exchange(
        source(3),
        nlb.listeners.addr("auto"),
        &[&startup],
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert_eq!(got.instance, "pg-sniffed");

    let received = finished(&nlb, &declared, 2).await;
    assert_eq!(
        received,
        vec![b"hello after the banner".to_vec(), startup.clone()]
    );
    assert_eq!(finished(&nlb, &sniffed, 1).await, vec![startup]);

    let text = metrics_until(&nlb, "three connections counted", |t| {
        metric_sum(t, "nlb_connections_total", &[]) >= 3.0
    })
    .await;
    let pg_labels = [
        ("listener", "pg"),
        ("protocol", "postgres"),
        ("module", "dblb"),
    ];
    assert_eq!(metric_sum(&text, "nlb_connections_total", &pg_labels), 2.0);
    assert_eq!(
        metric_sum(&text, "nlb_sniff_total", &[("listener", "pg")]),
        0.0,
        "a declared listener never sniffs"
    );
    assert_eq!(
        metric_sum(
            &text,
            "nlb_sniff_total",
            &[("listener", "auto"), ("outcome", "postgres")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_v2_listener_strips_the_header_and_forwards_the_rest_in_order() {
    use shared_types::proxy_v2;
    let sb = Sandbox::new();
    let web = DataServer::start("backend-a", Behaviour::Echo).await;
    let addr = web.addr;
    // Sniffing behind a trusted load balancer that sends PROXY v2.
    let front = "auto, proxy_protocol: true, trusted_proxies: [\"127.0.0.0/8\"]";
    let nlb = start_nlb(&sb, &[("front", front)], |l| {
        web_pool(&[addr.to_string()], "http", l.port("front"))
    })
    .await;
    let to = nlb.listeners.addr("front");
    let header = proxy_v2::encode(&proxy_v2::Header::proxy(
        "203.0.113.7:40000".parse().unwrap(),
        to,
    ))
    .unwrap();
    let request: &[u8] = b"GET / HTTP/1.1\r\nHost: switchyard.test\r\n\r\n";
    let whole = [header.as_slice(), request].concat();
    let sends: [Vec<&[u8]>; 3] = [
        // Header and request in one write (read at once, before the
        // reactor has seen the socket).
        vec![&whole],
        // The header split, then the request.
        vec![&header[..10], &header[10..], request],
        // The header and the request's first bytes, then its rest.
        vec![&whole[..header.len() + 5], &whole[header.len() + 5..]],
    ];
    for (i, chunks) in sends.iter().enumerate() {
        let got = exchange(source(i), to, chunks, Duration::from_millis(30))
            .await
            .unwrap_or_else(|e| panic!("send {i}: {e}; nlb stderr:\n{}", nlb.stderr()));
        assert_eq!(got.instance, "backend-a", "send {i}");
        assert_eq!(
            got.echoed, request,
            "send {i}: the echo is the request alone"
        );
    }
    // The backend got the request alone each time: the header went no
    // further than the NLB.
    let received = finished(&nlb, &web, sends.len()).await;
    assert_eq!(received, vec![request.to_vec(); sends.len()]);

    // No header: the connection is closed and counted, and the backend
    // sees nothing of it.
    let refused = exchange(source(9), to, &[request], Duration::from_millis(30)).await;
    assert!(refused.is_err(), "{refused:?}");
    metrics_until(&nlb, "the refused header counted", |text| {
        metric_sum(
            text,
            "nlb_rejected_connections_total",
            &[("listener", "front"), ("reason", "proxy_header")],
        ) == 1.0
    })
    .await;
    assert_eq!(web.accepted(), sends.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_named_by_host_name_is_resolved_when_connecting() {
    let sb = Sandbox::new();
    let a = DataServer::start("backend-a", Behaviour::Echo).await;
    let port = a.addr.port();
    let nlb = start_nlb(&sb, &[("pool", "tcp")], |l| {
        web_pool(&[format!("localhost:{port}")], "tcp", l.port("pool"))
    })
    .await;
    let to = nlb.listeners.addr("pool");
    let got = run_bounded(20, 4, LOAD_DEADLINE, move |i| banner_from(source(i), to)).await;
    let (by, failures) = tally(&got);
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert_eq!(by.get("backend-a").copied(), Some(20), "{by:?}");
    assert_eq!(a.accepted(), 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_static_pool_shares_connections_and_survives_a_closed_backend() {
    let sb = Sandbox::new();
    let a = DataServer::start("backend-a", Behaviour::Echo).await;
    let mut b = DataServer::start("backend-b", Behaviour::Echo).await;
    let (a_addr, b_addr) = (a.addr, b.addr);
    let nlb = start_nlb(&sb, &[("pool", "tcp")], |l| {
        web_pool(
            &[a_addr.to_string(), b_addr.to_string()],
            "tcp",
            l.port("pool"),
        )
    })
    .await;
    let to = nlb.listeners.addr("pool");

    let first = run_bounded(200, 16, LOAD_DEADLINE, move |i| banner_from(source(i), to)).await;
    let (by, failures) = tally(&first);
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    let (on_a, on_b) = (
        by.get("backend-a").copied().unwrap_or(0),
        by.get("backend-b").copied().unwrap_or(0),
    );
    assert_eq!(on_a + on_b, 200, "{by:?}");
    assert!(
        on_a >= 40 && on_b >= 40,
        "both backends take a share: {by:?}"
    );
    assert_eq!((a.accepted(), b.accepted()), (on_a, on_b));

    // One backend stops listening: the NLB tries the other.
    b.close().await;
    let second = run_bounded(200, 16, LOAD_DEADLINE, move |i| {
        banner_from(source(200 + i), to)
    })
    .await;
    let (by, failures) = tally(&second);
    assert!(
        failures.is_empty(),
        "{} connections failed after backend-b closed: {failures:?}\nstderr:\n{}",
        failures.len(),
        nlb.stderr()
    );
    assert_eq!(by.get("backend-a"), Some(&200), "{by:?}");
    assert_eq!(a.accepted(), on_a + 200);
    assert_eq!(b.accepted(), on_b);

    let text = metrics_until(&nlb, "400 connections counted", |t| {
        metric_sum(t, "nlb_connections_total", &[("listener", "pool")]) >= 400.0
    })
    .await;
    let labels = [
        ("listener", "pool"),
        ("protocol", "tcp"),
        ("module", "backend"),
    ];
    assert_eq!(metric_sum(&text, "nlb_connections_total", &labels), 400.0);
    let failed = metric_sum(
        &text,
        "nlb_connect_failures_total",
        &[("module", "backend")],
    );
    assert!(
        failed >= 1.0,
        "connects to the closed backend counted: {failed}"
    );
    assert!(
        metric_sum(&text, "nlb_ejections_total", &[("module", "backend")]) >= 1.0,
        "the closed backend is ejected after consecutive failures"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_opened_at_once_are_spread_over_the_data_threads() {
    use tokio::io::AsyncReadExt;
    let sb = Sandbox::new();
    let backend = DataServer::start("backend", Behaviour::Echo).await;
    let addr = backend.addr;
    let nlb = start_nlb(&sb, &[("pool", "tcp")], |l| {
        format!(
            "dataplane: {{threads: 2}}\n{}",
            web_pool(&[addr.to_string()], "tcp", l.port("pool"))
        )
    })
    .await;
    let to = nlb.listeners.addr("pool");
    // 64 connections opened at once before any is read, as a client pool
    // opens them: whichever data thread is awake would take them all.
    let mut connecting = tokio::task::JoinSet::new();
    for i in 0..64 {
        connecting.spawn(connect_from(source(i), to));
    }
    let mut held = Vec::new();
    while let Some(c) = connecting.join_next().await {
        held.push(c.expect("the connect task").expect("connect"));
    }
    for (i, s) in held.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(30), s.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(1))),
            "connection {i}: no banner from the backend: {read:?}"
        );
    }
    let text = metrics_until(&nlb, "64 connections open", |t| {
        metric_sum(t, "nlb_data_thread_connections", &[]) >= 64.0
    })
    .await;
    let per_thread: Vec<f64> = ["0", "1"]
        .iter()
        .map(|t| metric_sum(&text, "nlb_data_thread_connections", &[("thread", t)]))
        .collect();
    assert_eq!(per_thread.iter().sum::<f64>(), 64.0, "{per_thread:?}");
    // Within the spread's slack: 4 and an eighth of the lighter thread.
    assert!(
        per_thread.iter().all(|&n| n >= 26.0),
        "64 connections were served {per_thread:?} by the two data threads"
    );
    assert_eq!(backend.open(), 64);
    drop(held);
    metrics_until(&nlb, "every connection closed", |t| {
        metric_sum(t, "nlb_data_thread_connections", &[]) == 0.0
    })
    .await;
}

/// An NLB with a `tcp` listener `web` and three alb instances announcing the
/// same route: `v1-a` and `v1-b` at version 1.0, the canary `v2` at 2.0.
async fn canary_stack(sb: &Sandbox, sections: &str) -> (L4Nlb, Vec<e2e::l4::FakeModule>) {
    let nlb = start_nlb(sb, &[("web", "tcp")], |_| sections.to_string()).await;
    let port = nlb.listeners.port("web");
    let mut modules = Vec::new();
    for (id, version) in [("v1-a", "1.0"), ("v1-b", "1.0"), ("v2", "2.0")] {
        let spec = ModuleSpec::new(
            id,
            ModuleType::Alb,
            vec![route("web", Protocol::Tcp, port, "")],
        )
        .version(version);
        modules.push(register(&nlb, spec).await);
    }
    (nlb, modules)
}

fn weights(v1: u32, v2: u32) -> String {
    format!("{{alb: {{\"1.0\": {v1}, \"2.0\": {v2}}}}}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ten_percent_version_weight_takes_ten_percent_of_connections() {
    let sb = Sandbox::new();
    let (nlb, _modules) =
        canary_stack(&sb, &format!("traffic_weights: {}\n", weights(90, 10))).await;
    let to = nlb.listeners.addr("web");

    const N: usize = 5000;
    let started = std::time::Instant::now();
    let results = run_bounded(N, PARALLEL, LOAD_DEADLINE, move |i| {
        banner_from(source(i), to)
    })
    .await;
    let (by, failures) = tally(&results);
    eprintln!("{N} connections in {:?}: {by:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} of {N} connections failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    let share = |id: &str| 100.0 * by.get(id).copied().unwrap_or(0) as f64 / N as f64;
    let canary = share("v2");
    assert!(
        (8.0..=12.0).contains(&canary),
        "the 10% version took {canary:.2}% of {N} connections: {by:?}"
    );
    // The 90% go to both 1.0 instances.
    assert!(
        share("v1-a") >= 25.0 && share("v1-b") >= 25.0,
        "both 1.0 instances take a share: {by:?}"
    );
    let text = metrics_until(&nlb, "every connection counted", |t| {
        metric_sum(t, "nlb_connections_total", &[("listener", "web")]) >= N as f64
    })
    .await;
    assert_eq!(
        metric_sum(
            &text,
            "nlb_connections_total",
            &[("listener", "web"), ("protocol", "tcp"), ("module", "alb")]
        ),
        N as f64
    );
}

/// One connection from each of `sources`: the instance each reached.
async fn instances_seen(nlb: &L4Nlb, sources: &[Ipv4Addr]) -> Vec<String> {
    let to = nlb.listeners.addr("web");
    let sources = sources.to_vec();
    let n = sources.len();
    let results = run_bounded(n, PARALLEL, LOAD_DEADLINE, move |i| {
        banner_from(sources[i], to)
    })
    .await;
    let (_, failures) = tally(&results);
    assert!(
        failures.is_empty(),
        "{} of {n} connections failed: {:?}; stderr:\n{}",
        failures.len(),
        &failures[..failures.len().min(10)],
        nlb.stderr()
    );
    results.into_iter().map(Result::unwrap).collect()
}

/// Indices of the sources that reached the canary.
fn canaries(seen: &[String]) -> BTreeSet<usize> {
    seen.iter()
        .enumerate()
        .filter(|(_, id)| *id == "v2")
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sticky_sources_keep_the_canary_while_its_weight_rises() {
    let sb = Sandbox::new();
    let file = |v1, v2| {
        format!(
            "routing: {{sticky: true}}\ntraffic_weights: {}\n",
            weights(v1, v2)
        )
    };
    let (nlb, _modules) = canary_stack(&sb, &file(90, 10)).await;
    const N: usize = 2000;
    let sources: Vec<Ipv4Addr> = (0..N).map(|i| source(10_000 + i)).collect();
    let pct = |set: &BTreeSet<usize>| 100.0 * set.len() as f64 / N as f64;

    // At 10%: the same source reaches the same instance every time.
    let at10 = instances_seen(&nlb, &sources).await;
    let again = instances_seen(&nlb, &sources).await;
    let moved: Vec<usize> = (0..N).filter(|i| at10[*i] != again[*i]).collect();
    assert!(
        moved.is_empty(),
        "{} sources changed instance at a fixed weight, e.g. {} went {} then {}",
        moved.len(),
        sources[moved[0]],
        at10[moved[0]],
        again[moved[0]]
    );
    let c10 = canaries(&at10);
    assert!(
        (6.0..=14.0).contains(&pct(&c10)),
        "at 10%, {:.1}% of sources reached the canary",
        pct(&c10)
    );

    // 20% through the config file and SIGHUP.
    sb.write_config(&{
        let mut yaml = String::from("listeners:\n");
        yaml.push_str(&format!(
            "  - {{name: web, bind: \"{}\", protocol: tcp}}\n",
            nlb.listeners.addr("web")
        ));
        yaml.push_str(&file(80, 20));
        yaml
    });
    nlb.signal("HUP");
    metrics_until(&nlb, "the config reloaded", |t| {
        metric_sum(t, "nlb_config_reloads_total", &[("result", "ok")]) >= 1.0
    })
    .await;
    let at20 = instances_seen(&nlb, &sources).await;
    let c20 = canaries(&at20);
    let lost: Vec<&usize> = c10.difference(&c20).collect();
    assert!(
        lost.is_empty(),
        "{} canary sources left the canary when its weight rose to 20%",
        lost.len()
    );
    assert!(
        (16.0..=24.0).contains(&pct(&c20)),
        "at 20%, {:.1}% of sources reached the canary",
        pct(&c20)
    );

    // 50% through the control API.
    l4::update_section(&nlb, "traffic_weights", &weights(50, 50)).await;
    let at50 = instances_seen(&nlb, &sources).await;
    let again50 = instances_seen(&nlb, &sources).await;
    assert_eq!(at50, again50, "sources changed instance at a fixed 50%");
    let c50 = canaries(&at50);
    let lost: Vec<&usize> = c20.difference(&c50).collect();
    assert!(
        lost.is_empty(),
        "{} canary sources left the canary when its weight rose to 50%",
        lost.len()
    );
    assert!(
        (46.0..=54.0).contains(&pct(&c50)),
        "at 50%, {:.1}% of sources reached the canary",
        pct(&c50)
    );
    eprintln!(
        "sources on the canary: {:.1}% at 10, {:.1}% at 20, {:.1}% at 50",
        pct(&c10),
        pct(&c20),
        pct(&c50)
    );
    // Sources still on 1.0 kept their 1.0 instance throughout.
    let switched: Vec<usize> = (0..N)
        .filter(|i| !c50.contains(i) && (at10[*i] != at50[*i] || at20[*i] != at50[*i]))
        .collect();
    assert!(
        switched.is_empty(),
        "{} sources on 1.0 changed instance while the canary's weight rose",
        switched.len()
    );
}

/// Polls `GetLoadDistribution` until the active connections by instance are
/// `want`.
async fn distribution_until(nlb: &L4Nlb, what: &str, want: &BTreeMap<String, i32>) {
    let last = std::sync::Mutex::new(BTreeMap::new());
    poll_until(
        &format!("GetLoadDistribution shows {what}: {want:?}"),
        || {
            format!(
                "last distribution: {:?}; stderr:\n{}",
                last.lock().unwrap(),
                nlb.stderr()
            )
        },
        || async {
            let seen = l4::active_by_instance(nlb).await;
            let done = seen == *want;
            *last.lock().unwrap() = seen;
            done.then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dataplane_metrics_and_load_distribution_follow_the_traffic() {
    let garbage: &[u8] = b"zzzz this is no protocol the NLB knows\r\n";
    assert_eq!(
        sniff::sniff(garbage),
        Verdict::NoMatch,
        "garbage must not match"
    );

    let sb = Sandbox::new();
    let nlb = start_nlb(
        &sb,
        &[("auto", "auto"), ("hold-a", "tcp"), ("hold-b", "tcp")],
        |_| "dataplane: {sniff_timeout_ms: 300}\n".to_string(),
    )
    .await;
    let l = nlb.listeners.clone();
    let mut modules = BTreeMap::new();
    for (id, t, p, listener) in [
        ("web", ModuleType::Alb, Protocol::Http, "auto"),
        ("cache", ModuleType::Dblb, Protocol::Redis, "auto"),
        // What is not recognised, or not said in time, takes the TCP route.
        ("fallback", ModuleType::Ailb, Protocol::Tcp, "auto"),
        ("hold-a", ModuleType::Alb, Protocol::Tcp, "hold-a"),
        ("hold-b", ModuleType::Alb, Protocol::Tcp, "hold-b"),
    ] {
        let spec = ModuleSpec::new(id, t, vec![route(id, p, l.port(listener), "")]);
        modules.insert(id, register(&nlb, spec).await);
    }

    let http = fixture("curl-http1");
    let redis = fixture("redis-cli-resp");
    let mut up = 0;
    let mut down = 0;
    let mut n = 0;
    for (bytes, want) in [
        (&http[..], "web"),
        (&http[..], "web"),
        (&http[..], "web"),
        (&redis[..], "cache"),
        (&redis[..], "cache"),
        (garbage, "fallback"),
    ] {
        let got = exchange(source(n), l.addr("auto"), &[bytes], Duration::ZERO)
            .await
            .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", nlb.stderr()));
        n += 1;
        assert_eq!(got.instance, want);
        assert_eq!(got.echoed, bytes);
        up += bytes.len();
        down += l4::BANNER.len() + want.len() + 1 + bytes.len();
    }
    // A client that says nothing: after the sniff timeout, the TCP route.
    let silent = banner_from(source(n), l.addr("auto"))
        .await
        .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", nlb.stderr()));
    assert_eq!(silent, "fallback");
    down += l4::BANNER.len() + "fallback".len() + 1;

    let auto = |k: &'static str, v: &'static str| [("listener", "auto"), (k, v)];
    let text = metrics_until(&nlb, "the auto listener's traffic counted", |t| {
        metric_sum(t, "nlb_bytes_total", &auto("direction", "downstream")) >= down as f64
            && metric_sum(t, "nlb_connections_open", &[]) == 0.0
    })
    .await;
    let sniffed = |outcome| metric_sum(&text, "nlb_sniff_total", &auto("outcome", outcome));
    assert_eq!(
        [
            sniffed("http1"),
            sniffed("redis"),
            sniffed("no_match"),
            sniffed("timeout"),
            sniffed("closed"),
        ],
        [3.0, 2.0, 1.0, 1.0, 0.0],
        "nlb_sniff_total on auto: http1, redis, no_match, timeout, closed"
    );
    let conns = |protocol, module| {
        metric_sum(
            &text,
            "nlb_connections_total",
            &[
                ("listener", "auto"),
                ("protocol", protocol),
                ("module", module),
            ],
        )
    };
    assert_eq!(
        [
            conns("http1", "alb"),
            conns("redis", "dblb"),
            conns("tcp", "ailb"),
        ],
        [3.0, 2.0, 2.0],
        "nlb_connections_total on auto by protocol and module"
    );
    assert_eq!(
        metric_sum(&text, "nlb_bytes_total", &auto("direction", "upstream")),
        up as f64,
        "client-to-instance bytes"
    );
    assert_eq!(
        metric_sum(&text, "nlb_bytes_total", &auto("direction", "downstream")),
        down as f64,
        "instance-to-client bytes"
    );

    // Connections held open show per instance and per listener.
    let mut held = Vec::new();
    for (i, listener) in ["hold-a", "hold-a", "hold-a", "hold-b", "hold-b"]
        .iter()
        .enumerate()
    {
        let (conn, id) = hold(source(100 + i), l.addr(listener)).await.unwrap();
        assert_eq!(id, *listener);
        held.push(conn);
    }
    let want: BTreeMap<String, i32> = [
        ("web", 0),
        ("cache", 0),
        ("fallback", 0),
        ("hold-a", 3),
        ("hold-b", 2),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    distribution_until(&nlb, "the held connections", &want).await;
    let text = metrics_until(&nlb, "the held connections open", |t| {
        metric_sum(t, "nlb_connections_open", &[]) == 5.0
    })
    .await;
    assert_eq!(
        metric_sum(&text, "nlb_active_connections", &[("listener", "hold-a")]),
        3.0
    );
    assert_eq!(
        metric_sum(&text, "nlb_active_connections", &[("listener", "hold-b")]),
        2.0
    );
    assert_eq!(
        metric_sum(&text, "nlb_active_connections", &[("listener", "auto")]),
        0.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "nlb_connections_total",
            &[
                ("listener", "hold-a"),
                ("protocol", "tcp"),
                ("module", "alb")
            ]
        ),
        3.0
    );
    assert_eq!(
        metric_sum(&text, "nlb_sniff_total", &[("listener", "hold-a")]),
        0.0,
        "a declared listener never sniffs"
    );

    // Closed, they are gone from both.
    drop(held);
    let zero: BTreeMap<String, i32> = want.keys().map(|k| (k.clone(), 0)).collect();
    distribution_until(&nlb, "no connection", &zero).await;
    metrics_until(&nlb, "no connection open", |t| {
        metric_sum(t, "nlb_connections_open", &[]) == 0.0
            && metric_sum(t, "nlb_active_connections", &[]) == 0.0
    })
    .await;
    assert_eq!(modules["hold-a"].accepted(), 3);
    assert_eq!(modules["hold-b"].accepted(), 2);
}
