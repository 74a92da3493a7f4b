//! The whole path a user runs: client -> NLB (an `auto` listener that
//! sniffs HTTP/1 and routes on the Host) -> ALB (registered with the NLB,
//! its routes announced) -> origin.

use e2e::alb::{cluster, curl, seen, start_alb_with_sdk, AlbLaunch};
use e2e::origin;
use e2e::{free_port, Launch, Sandbox};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn http_reaches_the_origin_through_the_nlb_and_the_alb() {
    let sb = Sandbox::new();
    let shop = origin::start("shop").await;
    let api = origin::start("api").await;
    let port = free_port();
    sb.write_config(&format!(
        "listeners:\n  - {{name: web, bind: \"127.0.0.1:{port}\", protocol: auto}}\n"
    ));
    let nlb = sb
        .start_with(Launch {
            use_config_file: true,
            ..Launch::default()
        })
        .await;
    // The ALB asks for a PROXY v2 header, so it sees the real client.
    let alb = start_alb_with_sdk(
        sb.path(),
        &nlb.grpc_addr,
        &AlbLaunch::new(
            "alb-behind-nlb",
            json!({
                "routes": [
                    {"id": "shop", "hosts": ["shop.example.test"], "cluster": "shop"},
                    {"id": "api", "hosts": ["api.example.test"], "cluster": "api"},
                ],
                "clusters": [cluster("shop", &[&shop]), cluster("api", &[&api])],
            }),
        ),
        &json!({"data": {"proxy_protocol": true}}),
    )
    .await;
    alb.wait_registered().await;

    // The ALB's announced routes reach the NLB's table; then each Host goes
    // NLB -> ALB -> its origin, with the client's address (from another
    // loopback address than the NLB's) carried by PROXY v2.
    let url = format!("http://127.0.0.1:{port}/cart?id=7");
    let mut answered = None;
    for _ in 0..100 {
        let r = curl(
            sb.path(),
            &[
                "--interface",
                "127.0.0.5",
                "-H",
                "Host: shop.example.test",
                &url,
            ],
        )
        .await;
        if r.status == 200 {
            answered = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let r = answered.expect("no 200 through the NLB within 10 s");
    let body = r.json();
    assert_eq!(body["origin"], "shop", "{body}");
    assert_eq!(body["path"], "/cart", "{body}");
    assert_eq!(body["query"], "id=7", "{body}");
    assert_eq!(seen(&body, "host"), Some("shop.example.test"));
    assert_eq!(seen(&body, "x-forwarded-for"), Some("127.0.0.5"));

    for _ in 0..5 {
        let r = curl(
            sb.path(),
            &[
                "-H",
                "Host: api.example.test",
                &format!("http://127.0.0.1:{port}/v1"),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["origin"], "api");
    }
    // A host nobody serves: the NLB's snapshot routes it to the ALB (its
    // routes announce hosts), or refuses it; either way the client is
    // answered or closed, never hung.
    let r = curl(
        sb.path(),
        &[
            "-H",
            "Host: nobody.example.test",
            &format!("http://127.0.0.1:{port}/"),
        ],
    )
    .await;
    assert_ne!(r.status, 200, "{r:?}");

    // The NLB counted the forwarded connections under the ALB's type.
    let metrics = reqwest_metrics(&nlb.admin_addr).await;
    let forwarded: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("nlb_connections_total{")
                && l.contains("listener=\"web\"")
                && l.contains("module=\"alb\"")
                && l.contains("protocol=\"http1\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(forwarded >= 6.0, "{metrics}");
}

async fn reqwest_metrics(admin: &str) -> String {
    e2e::alb::curl_stdout(&["-s", &format!("http://{admin}/metrics")]).await
}
