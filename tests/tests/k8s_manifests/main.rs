//! The Kubernetes manifests in `deploy/k8s`, checked without a cluster.
//!
//! Every file is parsed (multi-document YAML) and the references between
//! the objects are followed: `kustomization.yaml` lists exactly the files;
//! every object is in the namespace; selectors match pod labels; Service
//! target ports, probe ports, config map keys, secrets, volumes and the
//! state volume exist. The configs the containers load are parsed with the
//! NLB's and the SDK's own loaders and validators, with the environment
//! each Deployment sets, and must agree with the ports the manifests expose
//! and probe. The last tests break one reference at a time in memory and
//! show that the checker names it.

mod across;
mod configs;
mod container;
mod model;
mod pod;
mod programs;
mod refs;

use std::collections::BTreeSet;
use std::path::Path;

use serde_yaml_ng::Value;

use container::{config_path, mounted_file, Env};
use model::{Manifests, Report, POD_IP};
use programs::{workloads, Loaded};

/// Every problem in the manifests.
fn check(m: &Manifests) -> Vec<String> {
    let mut r = Report::default();
    refs::check_kustomization(m, &mut r);
    refs::check_objects(m, &mut r);
    for d in m.of_kind("Deployment") {
        pod::check_pod(m, d, &mut r);
    }
    refs::check_services(m, &mut r);
    refs::check_budgets_and_autoscalers(m, &mut r);
    let ws = workloads(m, &mut r);
    for w in &ws {
        configs::check_workload(m, w, &mut r);
    }
    across::check_across(m, &ws, &mut r);
    r.0
}

// ---------------------------------------------------------------- tests --

fn manifests() -> Manifests {
    Manifests::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s"))
}

#[test]
fn every_reference_between_the_manifests_holds() {
    let m = manifests();
    // What the checks below stand on: the objects a user gets.
    let kinds: BTreeSet<(&str, &str)> = m
        .objects
        .iter()
        .map(|o| (o.kind.as_str(), o.name.as_str()))
        .collect();
    for want in [
        ("Namespace", "switchyard"),
        ("Deployment", "nlb"),
        ("Deployment", "alb"),
        ("Deployment", "echo-module"),
        ("Deployment", "demo-origin"),
        ("Service", "nlb"),
        ("Service", "nlb-control"),
        ("Service", "demo-origin"),
        ("PersistentVolumeClaim", "nlb-state"),
        ("HorizontalPodAutoscaler", "alb"),
        ("HorizontalPodAutoscaler", "echo-module"),
        ("PodDisruptionBudget", "alb"),
        ("PodDisruptionBudget", "echo-module"),
    ] {
        assert!(
            kinds.contains(&want),
            "no {want:?} in deploy/k8s: {kinds:?}"
        );
    }
    let problems = check(&m);
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );

    // The configs were loaded, with the Deployments' environment: the
    // modules reach the NLB through nlb-control and advertise the pod IP.
    let mut r = Report::default();
    let ws = workloads(&m, &mut r);
    assert_eq!(ws.len(), 4, "one container per Deployment");
    for w in &ws {
        match (&w.loaded, w.program) {
            (Some(Loaded::Nlb(c)), "nlb") => {
                assert_eq!(c.listeners.len(), 2, "{:?}", c.listeners);
                assert_eq!(
                    c.state_file,
                    Path::new("/var/lib/switchyard/nlb.state.json")
                );
            }
            (Some(Loaded::Module(c)), "alb" | "echo-module") => {
                assert_eq!(c.nlb.addr, "nlb-control.switchyard.svc.cluster.local:50051");
                assert_eq!(c.advertise_host, POD_IP);
                assert_eq!(c.data.proxy_protocol, w.program == "alb", "{}", w.program);
            }
            (Some(Loaded::Origin(_)), "demo-origin") => {}
            _ => panic!("{} loaded nothing", w.program),
        }
    }
}

/// Runs `f` on the object, then the checker; returns its report.
fn broken(kind: &str, name: &str, f: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut m = manifests();
    let o = m
        .objects
        .iter_mut()
        .find(|o| o.kind == kind && o.name == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"));
    f(&mut o.v);
    check(&m)
}

/// Replaces `from` with `to` in the NLB's config file (ConfigMap
/// nlb-config, key nlb.yaml), then runs the checker; returns its report.
fn broken_nlb_config(from: &str, to: &str) -> Vec<String> {
    broken("ConfigMap", "nlb-config", |v| {
        let text = v["data"]["nlb.yaml"]
            .as_str()
            .expect("nlb.yaml")
            .replace(from, to);
        v["data"]["nlb.yaml"] = text.into();
    })
}

fn assert_reported(problems: &[String], parts: &[&str]) {
    assert!(
        problems
            .iter()
            .any(|p| parts.iter().all(|part| p.contains(part))),
        "no problem mentions all of {parts:?}; got:\n{}",
        problems.join("\n")
    );
}

fn first_container(v: &mut Value) -> &mut Value {
    &mut v["spec"]["template"]["spec"]["containers"][0]
}

#[test]
fn a_pod_label_that_drifts_from_its_selectors_is_named() {
    let problems = broken("Deployment", "alb", |v| {
        v["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] = "alb-v2".into();
    });
    assert_reported(
        &problems,
        &["alb.yaml: Deployment/alb: spec.selector.matchLabels"],
    );
    assert_reported(
        &problems,
        &[
            "alb.yaml: PodDisruptionBudget/alb: spec.selector",
            "0 Deployments",
        ],
    );
}

#[test]
fn an_env_override_of_the_admin_port_is_held_against_the_probes() {
    let problems = broken("Deployment", "alb", |v| {
        let env = first_container(v)["env"].as_sequence_mut().expect("env");
        env.push(
            serde_yaml_ng::from_str("{name: MODULE_ADMIN_LISTEN, value: '0.0.0.0:9200'}")
                .expect("yaml"),
        );
    });
    assert_reported(
        &problems,
        &[
            "Deployment/alb: containers[alb].livenessProbe.httpGet.port",
            "0.0.0.0:9200",
        ],
    );
    assert_reported(
        &problems,
        &[
            "Deployment/alb: containers[alb].ports[admin]",
            "0.0.0.0:9200",
        ],
    );
}

#[test]
fn a_listener_the_load_balancer_does_not_expose_is_named() {
    let problems = broken_nlb_config("0.0.0.0:7000", "0.0.0.0:7070");
    assert_reported(
        &problems,
        &[
            "nlb.yaml: Service/nlb: spec.ports",
            "listener echo (port 7070) is not exposed",
        ],
    );
    assert_reported(
        &problems,
        &[
            "nlb.yaml: Service/nlb: spec.ports[echo]",
            "targets container port 7000",
        ],
    );
    assert_reported(
        &problems,
        &[
            "Deployment/nlb: containers[nlb].ports",
            "listeners[echo].bind",
        ],
    );
    // echo's route still names the old port.
    assert_reported(
        &problems,
        &[
            "Deployment/echo-module",
            "module.routes[echo]",
            "destination_port 7000",
        ],
    );
}

#[test]
fn a_control_port_that_moved_is_held_against_the_modules() {
    let problems = broken("Service", "nlb-control", |v| {
        v["spec"]["ports"][0]["port"] = 50052.into();
    });
    assert_reported(
        &problems,
        &[
            "alb.yaml: Deployment/alb: containers[alb] config nlb.addr",
            "not the nlb-control Service's grpc port",
        ],
    );
    assert_reported(
        &problems,
        &["echo-module.yaml: Deployment/echo-module", "nlb.addr"],
    );
}

#[test]
fn an_invalid_config_fails_with_the_real_validator() {
    let problems = broken_nlb_config("listen: \"0.0.0.0:9090\"", "listen: \"localhost:9090\"");
    assert_reported(
        &problems,
        &[
            "Deployment/nlb: containers[nlb] config",
            "admin.listen",
            "localhost:9090",
        ],
    );
}

#[test]
fn a_missing_config_key_and_an_unlisted_file_are_named() {
    let problems = broken("Deployment", "echo-module", |v| {
        first_container(v)["env"][0]["value"] = "/etc/switchyard/echo.yml".into();
    });
    assert_reported(
        &problems,
        &[
            "Deployment/echo-module",
            "ConfigMap \"echo-config\" has no key \"echo.yml\"",
        ],
    );

    let mut m = manifests();
    let resources = m.kustomization["resources"]
        .as_sequence_mut()
        .expect("resources");
    resources.retain(|f| f.as_str() != Some("alb.yaml"));
    resources.push("typo.yaml".into());
    let problems = check(&m);
    assert_reported(&problems, &["alb.yaml: not listed in kustomization.yaml"]);
    assert_reported(
        &problems,
        &["kustomization.yaml: resources: typo.yaml is listed"],
    );
}

#[test]
fn a_state_file_off_the_volume_and_a_second_replica_are_named() {
    let problems = broken_nlb_config("/var/lib/switchyard/", "/tmp/");
    assert_reported(
        &problems,
        &[
            "Deployment/nlb: containers[nlb] config state_file",
            "/tmp/nlb.state.json is on no volumeMount",
        ],
    );
    let problems = broken("Deployment", "nlb", |v| v["spec"]["replicas"] = 2.into());
    assert_reported(
        &problems,
        &["Deployment/nlb: spec.replicas/strategy", "ReadWriteOnce"],
    );
}

#[test]
fn tokens_the_nlb_and_the_modules_must_share_are_checked() {
    let problems = broken("Deployment", "alb", |v| {
        for e in first_container(v)["env"].as_sequence_mut().expect("env") {
            if e["name"].as_str() == Some("MODULE_TOKEN") {
                e["valueFrom"]["secretKeyRef"]["key"] = "alb-token".into();
            }
        }
    });
    assert_reported(
        &problems,
        &[
            "Deployment/alb: containers[alb].env[MODULE_TOKEN]",
            "NLB_MODULE_TOKEN",
        ],
    );
}

/// The binaries themselves accept the configs: `--check-config` with each
/// Deployment's environment (echo's `module:` section has no validator
/// outside its binary).
#[test]
fn each_binary_accepts_its_config_with_check_config() {
    let m = manifests();
    let mut r = Report::default();
    let ws = workloads(&m, &mut r);
    assert!(r.0.is_empty(), "{:?}", r.0);
    for w in ws.iter().filter(|w| w.program != "demo-origin") {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let var = if w.program == "nlb" {
            "NLB_CONFIG"
        } else {
            "MODULE_CONFIG"
        };
        let path = config_path(w.c, &w.env, var).expect("a config path");
        let text = mounted_file(&m, w.d, w.c, &path).expect("the config");
        let file = dir
            .path()
            .join(Path::new(&path).file_name().expect("a file name"));
        std::fs::write(&file, text).expect("write");
        for with_secrets in [false, true] {
            let env = Env::of(&m, w.c, with_secrets);
            let out = std::process::Command::new(e2e::binary(w.program))
                .env_clear()
                .envs(&env.vars)
                .arg("--check-config")
                .arg(&file)
                .output()
                .expect("run --check-config");
            assert!(
                out.status.success(),
                "{} --check-config {path} (Secret present: {with_secrets}): {}\nstdout: {}\nstderr: {}",
                w.program,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
