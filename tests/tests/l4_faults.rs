//! The NLB's L4 data plane under faults, through the real `nlb` binary: an
//! instance killed under load, an instance drained, the NLB stopped with
//! connections open, routes and listeners changed under load, hostile
//! clients on a sniffing listener, half-closed connections and per-source
//! rate limits.
//!
//! Instances are real `echo-module` processes (where a test kills one) or
//! in-test servers registered over `RegisterModule` (where a test needs to
//! see exactly what reached them); the harness is `e2e::l4_faults`. A failed
//! connection is one the client saw refused, reset, closed before its
//! answer or unanswered. Every load here is bounded in count and time, and
//! every wait has a generous deadline; nothing asserts on how long
//! something took, only on counts and order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::l4_faults::*;
use e2e::module::{start_echo, ModuleLaunch};
use e2e::{poll_until, NlbProcess, Sandbox};
use serde_json::{json, Value};
use shared_types::pb::{self, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------
// 1. kill -9 of one of two instances under steady load

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_one_instance_under_load_fails_no_new_connection_and_ejects_it() {
    let sb = Sandbox::new();
    let (nlb, addrs) = start_nlb(
        &sb,
        &[lsn("edge", "tcp")],
        &json!({"dataplane": {
            "connect_attempts": 3,
            "eject_after_failures": 3,
            "connect_timeout_ms": 2000,
        }}),
    )
    .await;
    let edge = addrs["edge"].clone();
    let echo = |id: &str, greeting: &str| ModuleLaunch {
        instance_id: Some(id.into()),
        config: Some(format!("module:\n  greeting: {greeting}\n")),
        ..ModuleLaunch::default()
    };
    let mut a = start_echo(sb.path(), &nlb.grpc_addr, &echo("echo-a", "A")).await;
    let b = start_echo(sb.path(), &nlb.grpc_addr, &echo("echo-b", "B")).await;
    a.wait_registered().await;
    b.wait_registered().await;

    // Both instances take connections through the NLB.
    let warm = exchanges(&edge, None, 40, "warm").await;
    let warm: Vec<String> = warm
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("a warm-up connection failed: {e}")))
        .collect();
    assert!(
        warm.iter().any(|t| t == "A") && warm.iter().any(|t| t == "B"),
        "40 connections should reach both instances: {warm:?}"
    );

    const WORKERS: usize = 4;
    let load = start_load(&edge, Kind::Echo, WORKERS, Duration::from_millis(10));
    load.wait_done(200, || nlb.stderr()).await;
    let kill_sent = Instant::now();
    a.signal("KILL");
    let status = a.wait_exit().await;
    assert!(!status.success(), "echo-a was killed: {status}");
    // Every connection that starts from here on is a new one with A dead.
    let killed = Instant::now();
    let at_kill = load.done();
    load.wait_done(at_kill + 400, || nlb.stderr()).await;
    let attempts = load.stop().await;

    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.started >= killed).collect();
    let failed_after: Vec<&&Attempt> = after.iter().filter(|a| a.result.is_err()).collect();
    assert!(
        failed_after.is_empty(),
        "{} of {} connections opened after the kill failed: {failed_after:#?}",
        failed_after.len(),
        after.len()
    );
    let off_b: Vec<&&Attempt> = after
        .iter()
        .filter(|a| a.result.as_deref() != Ok("B"))
        .collect();
    assert!(
        off_b.is_empty(),
        "after the kill every connection lands on B: {off_b:#?}"
    );
    assert!(after.len() >= 300, "traffic went on: {}", after.len());
    // Before the kill nothing failed; the only failures allowed are the
    // connections in flight on A when it died (at most one per worker).
    let failed = failures(&attempts);
    assert!(
        failed
            .iter()
            .all(|a| a.ended >= kill_sent && a.started < killed),
        "only connections in flight at the kill may fail: {failed:#?}"
    );
    assert!(failed.len() <= WORKERS, "{failed:#?}");
    let before: Vec<&Attempt> = attempts.iter().filter(|a| a.ended < kill_sent).collect();
    assert!(
        before.iter().any(|a| a.result.as_deref() == Ok("A"))
            && before.iter().any(|a| a.result.as_deref() == Ok("B")),
        "before the kill the load reached both instances"
    );

    // The dead instance was ejected once, after its connect failures; no
    // client saw a connect failure.
    let ejections = metric(&nlb, "nlb_ejections_total", &[("module", "alb")]).await;
    assert_eq!(ejections, 1.0, "nlb_ejections_total{{module=\"alb\"}}");
    let connect_failures = metric(&nlb, "nlb_connect_failures_total", &[("module", "alb")]).await;
    assert!(
        connect_failures >= 3.0,
        "at least eject_after_failures (3) connect failures: {connect_failures}"
    );
    let refused = metric(
        &nlb,
        "nlb_rejected_connections_total",
        &[("listener", "edge"), ("reason", "connect_failed")],
    )
    .await;
    assert_eq!(refused, 0.0, "no connection ran out of connect attempts");
    assert!(
        nlb.stderr()
            .contains("ejected after consecutive connect failures"),
        "the ejection is logged"
    );
}

// ---------------------------------------------------------------------------
// 2. Draining an instance loses no connection in flight

#[tokio::test(flavor = "multi_thread")]
async fn graceful_unregister_moves_new_connections_and_lets_open_ones_finish() {
    let sb = Sandbox::new();
    let (nlb, addrs) = start_nlb(&sb, &[lsn("edge", "tcp")], &json!({})).await;
    let edge = addrs["edge"].clone();
    let (a, b) = (backend("A").await, backend("B").await);
    let reg_a = register(&nlb, "inst-a", &a.addr).await;
    register(&nlb, "inst-b", &b.addr).await;

    // Long-lived connections: three on A, at least one on B.
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for _ in 0..40 {
        if on_a.len() >= 3 && !on_b.is_empty() {
            break;
        }
        let mut c = Client::connect(&edge, None).await.expect("connect");
        match c.line().await.expect("a greeting").as_str() {
            "A" if on_a.len() < 3 => on_a.push(c),
            "A" => drop(c.finish().await),
            _ => on_b.push(c),
        }
    }
    assert_eq!(on_a.len(), 3, "three connections on A within 40");
    let held_a = on_a.len();
    let stop = Arc::new(AtomicBool::new(false));
    let every = Duration::from_millis(50);
    let busy: Vec<_> = on_a
        .into_iter()
        .enumerate()
        .map(|(i, c)| chatter(c, format!("a{i}"), every, stop.clone()))
        .chain(
            on_b.into_iter()
                .enumerate()
                .map(|(i, c)| chatter(c, format!("b{i}"), every, stop.clone())),
        )
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let resp = nlb
        .client()
        .await
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "inst-a".into(),
            registration_id: reg_a,
            graceful: true,
            drain_timeout_seconds: 120,
        })
        .await
        .expect("UnregisterModule")
        .into_inner();
    assert!(resp.success, "{resp:?}");
    assert_eq!(
        resp.active_connections_drained, held_a as i32,
        "the NLB counts A's open connections: {resp:?}"
    );
    let accepted_a = a.accepted.load(Ordering::Relaxed);

    // From now on new connections go to B only, while A's keep talking.
    let load = start_load(&edge, Kind::Echo, 2, Duration::from_millis(10));
    load.wait_done(200, || nlb.stderr()).await;
    let info = nlb
        .client()
        .await
        .get_module_info(pb::GetModuleInfoRequest {
            instance_id: "inst-a".into(),
        })
        .await
        .expect("A is still listed while it drains")
        .into_inner();
    assert_eq!(info.details["state"], "draining", "{:?}", info.details);
    let attempts = load.stop().await;
    assert!(failures(&attempts).is_empty(), "{:#?}", failures(&attempts));
    assert!(
        attempts.iter().all(|x| x.result.as_deref() == Ok("B")),
        "every new connection lands on B"
    );
    assert_eq!(
        a.accepted.load(Ordering::Relaxed),
        accepted_a,
        "A accepted no connection after the unregister"
    );

    // Each open connection finishes on its own: every line came back, and
    // each closes cleanly.
    stop.store(true, Ordering::Relaxed);
    for task in busy {
        let (mut c, lines) = task.await.expect("a chatter task");
        let lines = lines.unwrap_or_else(|e| panic!("a held connection failed: {e}"));
        assert!(
            lines >= 10,
            "the held connection kept talking: {lines} lines"
        );
        c.ask("last").await.expect("a last line after the load");
        let rest = c.finish().await.expect("a clean close");
        assert!(rest.is_empty());
    }
}

// ---------------------------------------------------------------------------
// 3. NLB SIGTERM

/// An NLB on one `tcp` listener in front of one in-test instance.
async fn nlb_with_one_instance(sb: &Sandbox, dataplane: Value) -> (NlbProcess, String, Backend) {
    let (nlb, addrs) = start_nlb(
        sb,
        &[lsn("edge", "tcp")],
        &json!({ "dataplane": dataplane }),
    )
    .await;
    let a = backend("A").await;
    register(&nlb, "inst-a", &a.addr).await;
    (nlb, addrs["edge"].clone(), a)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_refuses_new_connections_lets_open_ones_finish_then_exits_0() {
    let sb = Sandbox::new();
    let (mut nlb, edge, _a) =
        nlb_with_one_instance(&sb, json!({"drain_timeout_seconds": 300})).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(&edge, None).await.expect("connect");
        assert_eq!(c.line().await.expect("a greeting"), "A");
        held.push(c);
    }

    nlb.signal("TERM");
    wait_refused(&nlb, &edge).await;
    for i in 0..5 {
        let e = Client::connect(&edge, None)
            .await
            .err()
            .unwrap_or_else(|| panic!("connection {i} after the listener closed was accepted"));
        assert!(e.contains("ConnectionRefused"), "{e}");
    }
    // The open connections keep working; the NLB waits for them.
    for round in 0..10 {
        for (i, c) in held.iter_mut().enumerate() {
            c.ask(&format!("c{i}-r{round}"))
                .await
                .unwrap_or_else(|e| panic!("held connection {i} after SIGTERM: {e}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        nlb.try_exit().is_none(),
        "the NLB waits for open connections"
    );
    let last = held.pop().expect("three held");
    for c in held {
        assert!(c.finish().await.expect("a clean close").is_empty());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        nlb.try_exit().is_none(),
        "one connection is still open: the NLB still waits"
    );
    let mut last = last;
    last.ask("the last line")
        .await
        .expect("the last connection");
    assert!(last.finish().await.expect("a clean close").is_empty());
    // Exits once they are closed, long before the 300 s drain deadline
    // (the harness waits at most 60 s).
    let status = nlb.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{}", nlb.stderr());
    let logs = nlb.stderr();
    assert!(logs.contains("NLB stopped"), "{logs}");
    assert!(
        !logs.contains("connections still open at the drain deadline were closed"),
        "nothing was cut: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_connections_still_open_at_the_drain_deadline_then_exits_0() {
    let sb = Sandbox::new();
    let (mut nlb, edge, _a) = nlb_with_one_instance(&sb, json!({"drain_timeout_seconds": 2})).await;
    let mut c = Client::connect(&edge, None).await.expect("connect");
    assert_eq!(c.line().await.expect("a greeting"), "A");
    nlb.signal("TERM");
    let signalled = Instant::now();
    wait_refused(&nlb, &edge).await;
    c.ask("within the deadline")
        .await
        .expect("works until the deadline");
    // Then the NLB closes it (the client sees the end of the stream) and
    // exits 0, though the client never closed.
    // (A close or a reset: the NLB cut it; only no end at all fails.)
    let end = c.read_rest().await;
    assert!(
        !matches!(&end, Err(e) if e.starts_with("not closed")),
        "the NLB closed the connection at its deadline: {end:?}"
    );
    assert!(
        signalled.elapsed() >= Duration::from_millis(1500),
        "not closed before the drain deadline"
    );
    let status = nlb.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{}", nlb.stderr());
    assert!(
        nlb.stderr()
            .contains("connections still open at the drain deadline were closed"),
        "{}",
        nlb.stderr()
    );
}

// ---------------------------------------------------------------------------
// 4. Routing updates and listener changes under load

/// Sets the operator routes (replacing all) through `UpdateRouting`.
async fn set_operator_routes(nlb: &NlbProcess, routes: Vec<pb::Route>) {
    let resp = nlb
        .client()
        .await
        .update_routing(pb::UpdateRoutingRequest {
            routes,
            replace_all: true,
            source_instance_id: String::new(),
            validate_only: false,
        })
        .await
        .expect("UpdateRouting")
        .into_inner();
    assert!(resp.success, "{resp:?}");
}

/// An operator `TCP` route on `port` to the static pool `backend`, above
/// announced routes.
fn to_pool(port: u16, backend: &str) -> pb::Route {
    let mut r = e2e::control::route("l1-pool", Protocol::Tcp, port.into());
    r.priority = 10;
    r.metadata.insert("backend".into(), backend.into());
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn routing_and_listener_changes_under_load_fail_no_connection() {
    let sb = Sandbox::new();
    let (a, blue, green) = (backend("A").await, backend("B").await, backend("C").await);
    let extra = json!({
        "backends": {"blue": [blue.addr], "green": [green.addr]},
        "dataplane": {"drain_timeout_seconds": 300},
    });
    let (mut nlb, mut addrs) = start_nlb(&sb, &[lsn("l1", "tcp"), lsn("l3", "tcp")], &extra).await;
    register(&nlb, "inst-a", &a.addr).await;
    let (l1, l3) = (addrs["l1"].clone(), addrs["l3"].clone());
    let l1_port = port_of(&l1);
    set_operator_routes(&nlb, vec![to_pool(l1_port, "blue")]).await;
    assert_eq!(exchange(&l1, None, "first").await.as_deref(), Ok("B"));

    // A connection held open on L3 (announced route: instance A).
    let mut on_l3 = Client::connect(&l3, None).await.expect("connect to L3");
    assert_eq!(on_l3.line().await.expect("a greeting"), "A");

    let load = start_load(&l1, Kind::Echo, 2, Duration::from_millis(5));
    load.wait_done(50, || nlb.stderr()).await;

    // (a) Operator routes change under load: each change reaches the next
    // new connection.
    let plan: [(&str, Option<&str>); 7] = [
        ("C", Some("green")),
        ("A", None),
        ("B", Some("blue")),
        ("C", Some("green")),
        ("B", Some("blue")),
        ("A", None),
        ("C", Some("green")),
    ];
    // (sent, applied, expected tag) of each change.
    let mut changes: Vec<(Instant, Instant, &str)> = Vec::new();
    for (i, (tag, pool)) in plan.iter().enumerate() {
        let sent = Instant::now();
        let routes = pool.map(|p| vec![to_pool(l1_port, p)]).unwrap_or_default();
        set_operator_routes(&nlb, routes).await;
        let applied = Instant::now();
        changes.push((sent, applied, tag));
        assert_eq!(
            exchange(&l1, None, &format!("probe-{i}")).await.as_deref(),
            Ok(*tag),
            "change {i}: the next new connection follows the new route"
        );
        let n = load.done();
        load.wait_done(n + 40, || nlb.stderr()).await;
    }

    // (b) The config file: L1's limit changes (in place), L2 is added, L3
    // (with its open connection) is removed.
    addrs.insert("l2".into(), pick_addrs(&["l2"])["l2"].clone());
    let l2 = addrs["l2"].clone();
    let l1_limited = Lsn {
        max_connections: 10,
        ..lsn("l1", "tcp")
    };
    sb.write_config(&config_yaml(
        &[l1_limited, lsn("l2", "tcp")],
        &addrs,
        &extra,
    ));
    let reload_sent = Instant::now();
    nlb.signal("HUP");
    let on_l2 = poll_until(
        "L2 takes connections",
        || nlb.stderr(),
        || async { exchange(&l2, None, "l2").await.ok() },
    )
    .await;
    assert_eq!(on_l2, "A", "L2 has no operator route: instance A");
    wait_refused(&nlb, &l3).await;
    for i in 0..3 {
        let e = Client::connect(&l3, None)
            .await
            .err()
            .unwrap_or_else(|| panic!("connection {i} to the removed L3 was accepted"));
        assert!(e.contains("ConnectionRefused"), "{e}");
    }
    let reload_seen = Instant::now();
    for r in exchanges(&l2, None, 20, "l2").await {
        assert_eq!(r.as_deref(), Ok("A"));
    }
    // The connection on the removed listener keeps working until it closes.
    for i in 0..5 {
        on_l3
            .ask(&format!("l3-{i}"))
            .await
            .unwrap_or_else(|e| panic!("the held L3 connection after its listener went: {e}"));
    }
    assert!(on_l3.finish().await.expect("a clean close").is_empty());
    let n = load.done();
    load.wait_done(n + 100, || nlb.stderr()).await;
    let attempts = load.stop().await;

    let failed = failures(&attempts);
    assert!(
        failed.is_empty(),
        "{} of {} connections on L1 failed: {failed:#?}",
        failed.len(),
        attempts.len()
    );
    // Connections wholly inside one routing window reached its target.
    for (i, (_, applied, tag)) in changes.iter().enumerate() {
        let next_sent = changes.get(i + 1).map_or(reload_sent, |c| c.0);
        let inside: Vec<&Attempt> = attempts
            .iter()
            .filter(|x| x.started >= *applied && x.ended <= next_sent)
            .collect();
        assert!(
            !inside.is_empty(),
            "change {i}: some load connections ran under it"
        );
        let wrong: Vec<&&Attempt> = inside
            .iter()
            .filter(|x| x.result.as_deref() != Ok(*tag))
            .collect();
        assert!(wrong.is_empty(), "change {i} (to {tag}): {wrong:#?}");
    }
    let after_reload = attempts.iter().filter(|x| x.started >= reload_seen).count();
    assert!(after_reload >= 50, "L1 kept serving after the reload");
    assert_eq!(
        metric(&nlb, "nlb_config_reloads_total", &[("result", "ok")]).await,
        1.0
    );

    // L1's new limit applies in place: 10 open, the 11th is closed at once.
    poll_until(
        "L1 idle",
        || nlb.stderr(),
        || async {
            let open = metric(&nlb, "nlb_active_connections", &[("listener", "l1")]).await;
            (open == 0.0).then_some(())
        },
    )
    .await;
    let mut full = Vec::new();
    for i in 0..10 {
        let mut c = Client::connect(&l1, None).await.expect("connect");
        c.line()
            .await
            .unwrap_or_else(|e| panic!("connection {i} of 10 on L1: {e}"));
        full.push(c);
    }
    let eleventh = exchange(&l1, None, "eleventh").await;
    assert!(
        eleventh.is_err(),
        "the 11th connection is refused: {eleventh:?}"
    );
    assert_eq!(
        metric(
            &nlb,
            "nlb_rejected_connections_total",
            &[("listener", "l1"), ("reason", "listener_limit")]
        )
        .await,
        1.0
    );
    for c in full {
        assert!(c.finish().await.expect("a clean close").is_empty());
    }
    assert!(nlb.try_exit().is_none());
}

// ---------------------------------------------------------------------------
// 5. Garbage, half-open and slow clients

/// Deterministic bytes that no detector takes: the first four rule out
/// every protocol at once (not TLS, not text, a PostgreSQL length over
/// 10,000, a MongoDB length over 48 MB).
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    out[..4].copy_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
    out
}

/// The first 100 bytes of a 517-byte TLS ClientHello: a record header and a
/// handshake header that promise more.
fn half_client_hello() -> Vec<u8> {
    let mut b = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    b.extend((0..89u8).map(|i| i.wrapping_mul(37)));
    b
}

/// What one hostile client saw: the instance's greeting (it was forwarded)
/// or why not.
async fn hostile(addr: &str, send: Option<Vec<u8>>, half_close: bool) -> Result<String, String> {
    let mut c = Client::connect(addr, None).await?;
    if let Some(bytes) = send {
        c.send(&bytes).await?;
    }
    if half_close {
        c.half_close().await?;
        let rest = c.read_rest().await.map_err(|e| format!("closed: {e}"))?;
        return if rest.is_empty() {
            Err("closed".into())
        } else {
            Ok(String::from_utf8_lossy(&rest).into_owned())
        };
    }
    c.line().await
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_half_open_and_slow_clients_never_affect_other_connections() {
    let sb = Sandbox::new();
    const MAX_SNIFFING: usize = 16;
    let (mut nlb, addrs) = start_nlb(
        &sb,
        &[lsn("auto1", "auto"), lsn("plain", "tcp")],
        &json!({"dataplane": {"sniff_timeout_ms": 1500, "max_sniffing": MAX_SNIFFING}}),
    )
    .await;
    let a = backend("A").await;
    register(&nlb, "inst-a", &a.addr).await;
    let (auto, plain) = (addrs["auto1"].clone(), addrs["plain"].clone());

    // Good traffic: a loop on the declared listener for the whole test, a
    // held connection on the sniffing one, and a loop on the sniffing one
    // (paused for the slowloris burst, which fills the sniffing cap).
    let good = start_load(&plain, Kind::Echo, 2, Duration::from_millis(10));
    let mut held = Client::connect(&auto, None).await.expect("connect");
    held.send(b"GET /held HTTP/1.1\r\nHost: held.test\r\n\r\n")
        .await
        .expect("send");
    assert_eq!(held.line().await.expect("a greeting"), "A");
    for want in ["GET /held HTTP/1.1", "Host: held.test", ""] {
        assert_eq!(held.line().await.expect("the head echoed"), want);
    }
    let stop_held = Arc::new(AtomicBool::new(false));
    let held = chatter(
        held,
        "held".into(),
        Duration::from_millis(50),
        stop_held.clone(),
    );
    let good_auto = start_load(&auto, Kind::Http, 1, Duration::from_millis(10));
    good.wait_done(20, || nlb.stderr()).await;

    // Garbage: no detector matches; forwarded as plain TCP.
    const GARBAGE: usize = 10;
    for i in 0..GARBAGE {
        let r = hostile(&auto, Some(garbage(i as u64 + 1, 64)), false).await;
        assert_eq!(r.as_deref(), Ok("A"), "garbage client {i}");
    }
    // Silent clients and half ClientHellos, at once: they wait out the
    // sniff timeout, then go on as plain TCP.
    const SILENT: usize = 5;
    const HALF_HELLO: usize = 5;
    let mut stalled = Vec::new();
    for _ in 0..SILENT {
        let auto = auto.clone();
        stalled.push(tokio::spawn(
            async move { hostile(&auto, None, false).await },
        ));
    }
    for _ in 0..HALF_HELLO {
        let auto = auto.clone();
        stalled.push(tokio::spawn(async move {
            hostile(&auto, Some(half_client_hello()), false).await
        }));
    }
    // Clients that half-close at once: closed, nothing forwarded.
    const HALF_CLOSED: usize = 5;
    for i in 0..HALF_CLOSED {
        let r = hostile(&auto, None, true).await;
        assert_eq!(r, Err("closed".to_string()), "half-closed client {i}");
    }
    for (i, t) in stalled.into_iter().enumerate() {
        let r = t.await.expect("a stalled client");
        assert_eq!(r.as_deref(), Ok("A"), "stalled client {i}");
    }
    let auto_attempts = good_auto.stop().await;

    // A slowloris burst above the sniffing cap: the cap's worth wait out
    // the timeout, the rest are closed at once.
    const SLOW: usize = MAX_SNIFFING + 8;
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let mut c = Client::connect(&auto, None).await.expect("connect");
        c.send(b"GET / HTTP/1.1\r\n").await.expect("send");
        slow.push(c);
    }
    let mut slow_results = Vec::new();
    for mut c in slow {
        slow_results.push(c.line().await);
    }
    let admitted = slow_results
        .iter()
        .filter(|r| r.as_deref() == Ok("A"))
        .count();
    let turned_away = slow_results.iter().filter(|r| r.is_err()).count();
    assert_eq!(
        (admitted, turned_away),
        (MAX_SNIFFING, SLOW - MAX_SNIFFING),
        "{slow_results:?}"
    );

    // The sniffing listener serves good clients again.
    for i in 0..10 {
        assert_eq!(
            http_exchange(&auto, &format!("/after-{i}"))
                .await
                .as_deref(),
            Ok("A")
        );
    }
    stop_held.store(true, Ordering::Relaxed);
    let (held, lines) = held.await.expect("the held connection");
    let lines = lines.unwrap_or_else(|e| panic!("the held connection failed: {e}"));
    assert!(lines >= 10, "{lines}");
    assert!(held.finish().await.expect("a clean close").is_empty());
    let attempts = good.stop().await;
    assert!(
        failures(&attempts).is_empty(),
        "good clients on the declared listener: {:#?}",
        failures(&attempts)
    );
    assert!(
        failures(&auto_attempts).is_empty(),
        "good clients on the sniffing listener: {:#?}",
        failures(&auto_attempts)
    );
    assert!(!auto_attempts.is_empty());

    // The NLB is up and counted every outcome.
    assert!(nlb.try_exit().is_none());
    assert_eq!(nlb.get("/healthz").await.status, 200);
    let text = nlb.get("/metrics").await.body;
    let sniffed = |outcome: &str| {
        sample(
            &text,
            "nlb_sniff_total",
            &[("listener", "auto1"), ("outcome", outcome)],
        )
    };
    assert_eq!(sniffed("no_match"), GARBAGE as f64, "no_match");
    assert_eq!(
        sniffed("timeout"),
        (SILENT + HALF_HELLO + MAX_SNIFFING) as f64,
        "timeout"
    );
    assert_eq!(sniffed("closed"), HALF_CLOSED as f64, "closed");
    assert_eq!(
        sniffed("http1"),
        (1 + auto_attempts.len() + 10) as f64,
        "http1"
    );
    assert_eq!(
        sample(
            &text,
            "nlb_rejected_connections_total",
            &[("listener", "auto1"), ("reason", "sniff_limit")]
        ),
        (SLOW - MAX_SNIFFING) as f64
    );
    assert_eq!(
        sample(
            &text,
            "nlb_rejected_connections_total",
            &[("listener", "plain")]
        ),
        0.0
    );
}

// ---------------------------------------------------------------------------
// 6. Half-close end to end

/// An instance that reads its request to the end of the stream, then
/// answers (a line naming what it got, then 1 MiB) and closes.
async fn answerer() -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                if s.read_to_end(&mut req).await.is_err() {
                    return;
                }
                let _ = s.write_all(&answer_to(&req)).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

fn answer_to(req: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "got {} bytes, sha256 {}\n",
        req.len(),
        e2e::module::sha256_hex(req)
    )
    .into_bytes();
    out.extend((0..1024 * 1024u32).map(|i| (i % 251) as u8));
    out
}

/// Sends `req`, half-closes, and reads the whole answer.
async fn request_then_half_close(addr: &str, req: &[u8]) -> Result<Vec<u8>, String> {
    let mut c = Client::connect(addr, None).await?;
    c.send(req).await?;
    c.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn half_close_is_honoured_end_to_end() {
    let sb = Sandbox::new();
    let (nlb, addrs) = start_nlb(
        &sb,
        &[lsn("auto1", "auto"), lsn("plain", "tcp")],
        &json!({"dataplane": {"buffer_bytes": 4096}}),
    )
    .await;
    let (ans_addr, _ans) = answerer().await;
    register(&nlb, "answerer", &ans_addr).await;

    // A request bigger than the buffers, then the client's FIN: the instance
    // sees all of it, and the whole answer comes back after.
    let body: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 253) as u8).collect();
    let got = request_then_half_close(&addrs["plain"], &body)
        .await
        .expect("the exchange on the declared listener");
    assert_eq!(got.len(), answer_to(&body).len());
    assert!(got == answer_to(&body), "the answer arrived whole");

    // The same through the sniffing listener (an HTTP/1 upload).
    let mut upload = format!(
        "POST /upload HTTP/1.1\r\nHost: up.test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    upload.extend_from_slice(&body);
    let got = request_then_half_close(&addrs["auto1"], &upload)
        .await
        .expect("the exchange on the sniffing listener");
    assert!(got == answer_to(&upload), "the answer arrived whole");

    // The other way round: the instance says goodbye and half-closes first;
    // the client's upload after that still reaches it whole.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let bye_addr = listener.local_addr().expect("addr").to_string();
    let (tx, mut rx) = mpsc::channel(1);
    let _bye = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        s.write_all(b"bye\n").await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        let r = s.read_to_end(&mut got).await.map(|_| got);
        let _ = tx.send(r.map_err(|e| e.to_string())).await;
    });
    nlb.client()
        .await
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "answerer".into(),
            graceful: false,
            ..Default::default()
        })
        .await
        .expect("unregister the answerer");
    register(&nlb, "bye", &bye_addr).await;
    let mut c = Client::connect(&addrs["plain"], None)
        .await
        .expect("connect");
    assert_eq!(c.line().await.expect("the goodbye"), "bye");
    let rest = c.read_rest().await.expect("the instance's FIN arrives");
    assert!(rest.is_empty());
    let upload: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 241) as u8).collect();
    c.send(&upload).await.expect("the upload after the goodbye");
    c.half_close().await.expect("half-close");
    let seen = tokio::time::timeout(STEP, rx.recv())
        .await
        .expect("the instance reads to the end")
        .expect("a result");
    let seen = seen.expect("the instance read the upload");
    assert!(seen == upload, "{} of {} bytes", seen.len(), upload.len());
}

/// A short message and a half-close on a sniffing listener: `ping` could
/// still become an inline Redis `PING` line, so the detectors want more,
/// but the client's FIN says no more will come. The bytes go on as plain
/// TCP (the listener's `TCP` route) with the half-close, as `printf ping |
/// nc -N` expects.
#[tokio::test(flavor = "multi_thread")]
async fn a_short_message_then_half_close_on_a_sniffing_listener_is_forwarded() {
    let sb = Sandbox::new();
    let (nlb, addrs) = start_nlb(&sb, &[lsn("auto1", "auto")], &json!({})).await;
    let (ans_addr, _ans) = answerer().await;
    register(&nlb, "answerer", &ans_addr).await;
    let got = request_then_half_close(&addrs["auto1"], b"ping")
        .await
        .expect("the exchange");
    assert!(
        got == answer_to(b"ping"),
        "the answer to `ping`: got {} bytes ({:?}...)",
        got.len(),
        String::from_utf8_lossy(&got[..got.len().min(60)])
    );
}

// ---------------------------------------------------------------------------
// 7. Per-source rate limit

#[tokio::test(flavor = "multi_thread")]
async fn a_source_over_its_rate_is_refused_while_other_sources_are_not() {
    const RATE: usize = 1;
    const BURST: usize = 4;
    let sb = Sandbox::new();
    let (nlb, addrs) = start_nlb(
        &sb,
        &[lsn("plain", "tcp")],
        &json!({"dataplane": {"source_rate_per_second": RATE, "source_burst": BURST}}),
    )
    .await;
    let a = backend("A").await;
    register(&nlb, "inst-a", &a.addr).await;
    let plain = addrs["plain"].clone();

    // One source: rate + burst admitted at once, then refusals. The bucket
    // refills at RATE a second, so what is admitted beyond that depends on
    // how long the connections took: bounded from the times seen.
    let mut timed = Vec::new();
    for i in 0..12 {
        let started = Instant::now();
        let r = exchange(&plain, Some("127.0.0.1"), &format!("one-{i}")).await;
        timed.push((started, Instant::now(), r));
    }
    let first: Vec<Result<String, String>> = timed.iter().map(|t| t.2.clone()).collect();
    let ok: Vec<bool> = first.iter().map(Result::is_ok).collect();
    assert!(
        ok[..RATE + BURST].iter().all(|x| *x),
        "the first rate + burst connections are admitted: {first:?}"
    );
    let refill_period = Duration::from_secs(1) / RATE as u32;
    let next = &timed[RATE + BURST];
    if next.1 - timed[0].0 < refill_period {
        assert!(!ok[RATE + BURST], "the next one is refused: {first:?}");
    }
    let took = timed[timed.len() - 1].1 - timed[0].0;
    let admitted = ok.iter().filter(|x| **x).count();
    let refill = (took.as_secs_f64() * RATE as f64).ceil() as usize;
    assert!(
        admitted <= RATE + BURST + refill,
        "{admitted} admitted in {took:?}: {first:?}"
    );
    assert!(admitted < first.len(), "some were refused: {first:?}");
    let refused = first.iter().filter(|r| r.is_err()).count();
    for r in first.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            r.contains("closed before a whole line") || r.contains("reset"),
            "a refusal is a close at accept: {r}"
        );
    }

    // Other source addresses have their own buckets.
    for from in ["127.0.0.2", "127.0.0.3"] {
        let other = exchanges(&plain, Some(from), RATE + BURST, from).await;
        assert!(
            other.iter().all(|r| r.as_deref() == Ok("A")),
            "{from}: {other:?}"
        );
    }
    assert_eq!(
        metric(
            &nlb,
            "nlb_rejected_connections_total",
            &[("listener", "plain"), ("reason", "rate_limited")]
        )
        .await,
        refused as f64
    );

    // The first source gets a connection again once its bucket refills.
    tokio::time::sleep(Duration::from_millis(1500 / RATE as u64)).await;
    assert_eq!(
        exchange(&plain, Some("127.0.0.1"), "again")
            .await
            .as_deref(),
        Ok("A")
    );
}
