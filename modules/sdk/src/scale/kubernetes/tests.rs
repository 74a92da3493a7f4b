//! The Kubernetes scaler against an in-process fake API server that checks
//! every request's shape with the Kubernetes API types (k8s-openapi) and
//! answers with them.

use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::autoscaling::v1::{Scale, ScaleSpec, ScaleStatus};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Status as ApiStatus};
use k8s_openapi::List;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::net::TcpListener;

use super::*;

const TOKEN: &str = "sa-token-1";
const NS: &str = "edge";
const DEPLOYMENT: &str = "alb";
const SCALE_PATH: &str = "/apis/apps/v1/namespaces/edge/deployments/alb/scale";
const HPA_PATH: &str = "/apis/autoscaling/v2/namespaces/edge/horizontalpodautoscalers";

/// The body of the PATCH: a merge patch of a Scale that touches only
/// `spec.replicas`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScalePatch {
    spec: ScaleSpec,
}

#[derive(Default)]
struct State {
    spec_replicas: i32,
    status_replicas: i32,
    hpas: Vec<HorizontalPodAutoscaler>,
    /// Answer every call with 403 and this message.
    forbid: Option<String>,
    /// What came in: method, path, and the replicas of a PATCH.
    requests: Vec<(String, String, Option<i32>)>,
    /// Requests whose shape was wrong.
    faults: Vec<String>,
}

type Shared = Arc<Mutex<State>>;

fn json<T: serde::Serialize>(status: u16, value: &T) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(value).unwrap())))
        .unwrap()
}

fn api_status(code: u16, reason: &str, message: &str) -> Response<Full<Bytes>> {
    json(
        code,
        &ApiStatus {
            code: Some(i32::from(code)),
            message: Some(message.into()),
            reason: Some(reason.into()),
            status: Some("Failure".into()),
            ..ApiStatus::default()
        },
    )
}

fn scale_object(s: &State) -> Scale {
    Scale {
        metadata: ObjectMeta {
            name: Some(DEPLOYMENT.into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        spec: Some(ScaleSpec {
            replicas: Some(s.spec_replicas),
        }),
        status: Some(ScaleStatus {
            replicas: s.status_replicas,
            selector: Some("app=alb".into()),
        }),
    }
}

async fn handle(state: Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let auth = header("authorization");
    let accept = header("accept");
    let content_type = header("content-type");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut s = state.lock();
    let fault = |s: &mut State, what: String| {
        s.faults.push(what.clone());
        api_status(400, "BadRequest", &what)
    };
    s.requests.push((method.clone(), path.clone(), None));
    if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return api_status(401, "Unauthorized", "Unauthorized");
    }
    if accept.as_deref() != Some("application/json") {
        return fault(&mut s, format!("accept: {accept:?}"));
    }
    if let Some(m) = s.forbid.clone() {
        return api_status(403, "Forbidden", &m);
    }
    match (method.as_str(), path.as_str()) {
        ("GET", HPA_PATH) => {
            let list = List::<HorizontalPodAutoscaler> {
                items: s.hpas.clone(),
                metadata: Default::default(),
            };
            json(200, &list)
        }
        ("GET", SCALE_PATH) => json(200, &scale_object(&s)),
        ("PATCH", SCALE_PATH) => {
            if content_type.as_deref() != Some("application/merge-patch+json") {
                return fault(&mut s, format!("content-type: {content_type:?}"));
            }
            let patch: ScalePatch = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => return fault(&mut s, format!("patch body: {e}")),
            };
            let Some(n) = patch.spec.replicas else {
                return fault(&mut s, "patch without spec.replicas".into());
            };
            s.requests.last_mut().unwrap().2 = Some(n);
            s.spec_replicas = n;
            json(200, &scale_object(&s))
        }
        _ => api_status(
            404,
            "NotFound",
            &format!("the server could not find {path}"),
        ),
    }
}

/// The fake API server on loopback: plain HTTP, or TLS with `tls`.
async fn fake_api(state: Shared, tls: Option<Arc<rustls::ServerConfig>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(state, req).await) }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(tls) => {
                        if let Ok(s) = tokio_rustls::TlsAcceptor::from(tls).accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            });
        }
    });
    port
}

struct Setup {
    state: Shared,
    scaler: KubernetesScaler,
    _dir: tempfile::TempDir,
}

async fn setup(replicas: i32) -> Setup {
    let state: Shared = Arc::new(Mutex::new(State {
        spec_replicas: replicas,
        status_replicas: replicas,
        ..State::default()
    }));
    let port = fake_api(state.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let settings = KubernetesScaling {
        api: format!("http://127.0.0.1:{port}"),
        namespace: NS.into(),
        deployment: DEPLOYMENT.into(),
        token_file,
        ca_file: dir.path().join("unused-ca.crt"),
    };
    let scaler = KubernetesScaler::from_settings(&settings, &|_| None).unwrap();
    Setup {
        state,
        scaler,
        _dir: dir,
    }
}

fn to(n: i32) -> ScalingConfig {
    ScalingConfig {
        min_instances: n,
        max_instances: n,
        ..ScalingConfig::default()
    }
}

fn hpa(name: &str, kind: &str, target: &str) -> HorizontalPodAutoscaler {
    HorizontalPodAutoscaler {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        spec: Some(HorizontalPodAutoscalerSpec {
            max_replicas: 10,
            min_replicas: Some(1),
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: kind.into(),
                name: target.into(),
            },
            ..HorizontalPodAutoscalerSpec::default()
        }),
        status: None,
    }
}

#[tokio::test]
async fn scaling_to_three_patches_the_replicas_once_after_reading_them() {
    let t = setup(1).await;
    let out = t.scaler.scale(&to(3), true).await.unwrap();
    assert_eq!(
        out,
        ScaleOutcome {
            current_instances: 1,
            desired_instances: 3
        }
    );
    let s = t.state.lock();
    assert!(s.faults.is_empty(), "{:?}", s.faults);
    let calls: Vec<_> = s
        .requests
        .iter()
        .map(|(m, p, n)| (m.as_str(), p.as_str(), *n))
        .collect();
    assert_eq!(
        calls,
        [
            ("GET", HPA_PATH, None),
            ("GET", SCALE_PATH, None),
            ("PATCH", SCALE_PATH, Some(3)),
        ]
    );
    assert_eq!(s.spec_replicas, 3);
}

#[tokio::test]
async fn at_the_target_already_nothing_is_patched() {
    let t = setup(2).await;
    let out = t.scaler.scale(&to(2), true).await.unwrap();
    assert_eq!(out.desired_instances, 2);
    let s = t.state.lock();
    assert!(
        s.requests.iter().all(|(m, _, _)| m == "GET"),
        "{:?}",
        s.requests
    );
}

#[tokio::test]
async fn a_deployment_under_an_hpa_is_refused_naming_it() {
    let t = setup(2).await;
    t.state.lock().hpas = vec![
        hpa("other", "Deployment", "dblb"),
        hpa("web", "StatefulSet", DEPLOYMENT),
        hpa("alb-cpu", "Deployment", DEPLOYMENT),
    ];
    let e = t.scaler.scale(&to(4), true).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let m = e.to_string();
    assert!(
        m.contains("alb-cpu") && m.contains("edge/alb") && m.contains("delete the HPA"),
        "{m}"
    );
    let s = t.state.lock();
    assert!(
        s.requests.iter().all(|(m, _, _)| m == "GET"),
        "{:?}",
        s.requests
    );
    assert_eq!(s.spec_replicas, 2);
}

#[tokio::test]
async fn a_forbidden_call_says_the_apis_message_and_what_rbac_is_needed() {
    let t = setup(1).await;
    t.state.lock().forbid = Some(
        "horizontalpodautoscalers.autoscaling is forbidden: User \
         \"system:serviceaccount:edge:alb\" cannot list resource \"horizontalpodautoscalers\""
            .into(),
    );
    let e = t.scaler.scale(&to(3), true).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let m = e.to_string();
    assert!(m.contains("403"), "{m}");
    assert!(
        m.contains("User \"system:serviceaccount:edge:alb\" cannot list resource"),
        "{m}"
    );
    assert!(m.contains("deployments/scale"), "{m}");
}

#[tokio::test]
async fn a_missing_token_file_is_named() {
    let t = setup(1).await;
    let path = t.scaler.token_file.clone();
    std::fs::remove_file(&path).unwrap();
    let e = t.scaler.scale(&to(3), true).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    assert!(t.state.lock().requests.is_empty());
}

#[tokio::test]
async fn the_token_is_read_again_at_each_call() {
    let t = setup(1).await;
    std::fs::write(&t.scaler.token_file, "an-old-token").unwrap();
    let e = t.scaler.scale(&to(3), true).await.unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
    std::fs::write(&t.scaler.token_file, TOKEN).unwrap();
    t.scaler.scale(&to(3), true).await.unwrap();
    assert_eq!(t.state.lock().spec_replicas, 3);
}

#[tokio::test]
async fn a_missing_deployment_is_not_found() {
    let mut t = setup(1).await;
    t.scaler.deployment = "nope".into();
    let e = t.scaler.scale(&to(3), true).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    assert!(e.to_string().contains("\"nope\""), "{e}");
}

#[tokio::test]
async fn https_is_verified_against_the_ca_file() {
    let state: Shared = Arc::new(Mutex::new(State {
        spec_replicas: 1,
        status_replicas: 1,
        ..State::default()
    }));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let port = fake_api(state.clone(), Some(Arc::new(server))).await;
    let dir = tempfile::tempdir().unwrap();
    let (token_file, ca_file) = (dir.path().join("token"), dir.path().join("ca.crt"));
    std::fs::write(&token_file, TOKEN).unwrap();
    std::fs::write(&ca_file, cert.pem()).unwrap();
    // The in-cluster default: https://$KUBERNETES_SERVICE_HOST:$..._PORT.
    let env = move |k: &str| match k {
        "KUBERNETES_SERVICE_HOST" => Some("127.0.0.1".to_string()),
        "KUBERNETES_SERVICE_PORT" => Some(port.to_string()),
        _ => None,
    };
    let settings = KubernetesScaling {
        api: String::new(),
        namespace: NS.into(),
        deployment: DEPLOYMENT.into(),
        token_file,
        ca_file: ca_file.clone(),
    };
    let scaler = KubernetesScaler::from_settings(&settings, &env).unwrap();
    assert_eq!(
        scaler.scale(&to(2), true).await.unwrap().desired_instances,
        2
    );

    // Another CA: the server is not trusted, and the error says so.
    let other = rcgen::KeyPair::generate().unwrap();
    let other = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&other)
        .unwrap();
    std::fs::write(&ca_file, other.pem()).unwrap();
    let scaler = KubernetesScaler::from_settings(&settings, &env).unwrap();
    let e = scaler.scale(&to(3), true).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.to_string().contains("TLS"), "{e}");
    assert_eq!(state.lock().spec_replicas, 2);
}

#[test]
fn without_an_api_outside_a_pod_the_key_is_named() {
    let settings = KubernetesScaling {
        deployment: DEPLOYMENT.into(),
        namespace: NS.into(),
        ..KubernetesScaling::default()
    };
    let e = KubernetesScaler::from_settings(&settings, &|_| None)
        .err()
        .unwrap();
    assert!(e.starts_with("scaling.kubernetes.api"), "{e}");
}
