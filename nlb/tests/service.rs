//! Tests of the control service as a server, whatever the RPC: gRPC health,
//! `x-request-id` on responses and errors, the message size limit, garbage
//! bytes on the gRPC port, and the admin port (health, readiness, metrics,
//! status).

#[allow(dead_code)]
mod common;

use std::sync::Arc;

use common::*;
use shared_types::pb::{self, HealthStatus, ModuleType, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

// ===========================================================================
// Service basics: health, request ids, limits, bad bytes, admin port
// ===========================================================================

#[tokio::test]
async fn grpc_health_reports_serving() {
    let t = TestNlb::start().await;
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel(t.grpc_addr).await);
    for service in ["", "marchproxy.NLBService"] {
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "no.Such".into(),
        })
        .await;
    assert_status(r, Code::NotFound, &[]);
}

#[tokio::test]
async fn responses_carry_a_request_id_and_echo_a_given_one() {
    let t = TestNlb::start().await;
    let resp = t
        .client
        .clone()
        .get_nlb_status(pb::GetNlbStatusRequest::default())
        .await
        .unwrap();
    let id = resp
        .metadata()
        .get("x-request-id")
        .expect("x-request-id on the response")
        .to_str()
        .unwrap()
        .to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "generated id {id:?}");
    let resp2 = t
        .client
        .clone()
        .get_nlb_status(pb::GetNlbStatusRequest::default())
        .await
        .unwrap();
    assert_ne!(
        resp2
            .metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap(),
        id,
        "a new id per call"
    );

    let mut req = tonic::Request::new(pb::GetNlbStatusRequest::default());
    req.metadata_mut()
        .insert("x-request-id", "trace-me-42".parse().unwrap());
    let resp = t.client.clone().get_nlb_status(req).await.unwrap();
    assert_eq!(
        resp.metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap(),
        "trace-me-42"
    );
}

#[tokio::test]
async fn errors_carry_the_request_id_too() {
    let t = TestNlb::start().await;
    let mut req = tonic::Request::new(pb::GetModuleInfoRequest {
        instance_id: "ghost".into(),
    });
    req.metadata_mut()
        .insert("x-request-id", "err-trace-7".parse().unwrap());
    let s = t.client.clone().get_module_info(req).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    assert_eq!(
        s.metadata()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap()),
        Some("err-trace-7")
    );
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_nlb_keeps_serving() {
    let t = TestNlb::start_with("grpc: {max_message_bytes: 65536}").await;
    let mut inst = instance("alb-1", ModuleType::Alb, "127.0.0.1:1", None);
    inst.metadata.insert("blob".into(), "x".repeat(100 * 1024));
    let r = t
        .client
        .clone()
        .register_module(register_req(inst, vec![]))
        .await;
    let s = assert_status(r, Code::OutOfRange, &["too large", "65536"]);
    assert!(s.message().contains("bytes"), "{}", s.message());
    assert!(t.nlb.registry.list().is_empty());
    // The same client and a new one still work.
    t.register_simple("alb-2", ModuleType::Alb, "v1", vec![])
        .await;
    let s = t.status().await;
    assert_eq!(s.registered_modules, 1);
    let mut c = t.new_client().await;
    assert!(c
        .get_nlb_status(pb::GetNlbStatusRequest::default())
        .await
        .is_ok());
}

#[tokio::test]
async fn garbage_on_the_grpc_port_is_closed_and_the_nlb_keeps_serving() {
    let t = TestNlb::start().await;
    for garbage in [
        &b"\x00\x01\x02garbage that is not HTTP/2 at all\r\n\r\n\xff\xfe"[..],
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x09\x00\x00\x00\x00\x00junk"[..],
    ] {
        let mut s = tokio::net::TcpStream::connect(t.grpc_addr).await.unwrap();
        s.write_all(garbage).await.unwrap();
        let closed = tokio::time::timeout(SOON, async {
            let mut buf = [0u8; 4096];
            // Whatever the server says first (a GOAWAY, say), it then closes.
            for _ in 0..100 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => continue,
                }
            }
            false
        })
        .await;
        assert_eq!(closed, Ok(true), "connection closed after {garbage:?}");
    }
    assert_eq!(t.status().await.status, HealthStatus::Healthy as i32);
    t.register_simple("alb-1", ModuleType::Alb, "v1", vec![])
        .await;
}

#[tokio::test]
async fn admin_port_serves_health_readiness_metrics_and_status() {
    let t = TestNlb::start().await;
    t.register_simple(
        "alb-1",
        ModuleType::Alb,
        "v1",
        vec![route("web", Protocol::Http, 80)],
    )
    .await;

    let r = http_get(t.admin_addr, "/healthz").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body.trim(), "ok");
    let r = http_get(t.admin_addr, "/readyz").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body.trim(), "ready");

    let r = http_get(t.admin_addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{}",
        r.head
    );
    assert!(
        r.body
            .contains("nlb_registrations_total{result=\"registered\"} 1"),
        "{}",
        r.body
    );
    assert!(r.body.contains("nlb_routes 1"), "{}", r.body);

    let r = http_get(t.admin_addr, "/status").await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("status is JSON");
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["ready"], true);
    assert_eq!(v["routes"], 1);
    assert_eq!(v["modules"][0]["instance_id"], "alb-1");
    assert_eq!(v["modules"][0]["module_type"], "alb");
    assert_eq!(v["modules"][0]["state"], "healthy");

    let r = http_get(t.admin_addr, "/nope").await;
    assert_eq!(r.status, 404);

    // After shutdown begins, not ready.
    let nlb = Arc::clone(&t.nlb);
    let admin = t.admin_addr;
    t.shutdown().await;
    assert!(!nlb.ready.load(std::sync::atomic::Ordering::Relaxed));
    assert!(
        tokio::net::TcpStream::connect(admin).await.is_err()
            || http_get(admin, "/readyz").await.status != 200
    );
}
