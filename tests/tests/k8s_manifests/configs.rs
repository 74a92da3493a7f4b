//! One container against the config it loaded: the variables its program
//! reads, the addresses it listens on, its probes, its grace period, and
//! the NLB's state volume.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde_yaml_ng::Value;

use crate::container::deepest_mount;
use crate::model::{container_port, named, opt, port_of, seq, show, Manifests, Report, POD_IP};
use crate::programs::{Loaded, Workload};

/// The NLB's gRPC grace after SIGTERM without `--shutdown-grace-seconds`.
const NLB_DEFAULT_SHUTDOWN_GRACE: u64 = 10;
/// Variables the programs read besides config overrides and tokens.
const NLB_VARS: &[&str] = &[
    "NLB_CONFIG",
    "NLB_LOG",
    "NLB_LOG_FORMAT",
    "NLB_SHUTDOWN_GRACE_SECONDS",
    "RUST_LOG",
];
const MODULE_VARS: &[&str] = &[
    "MODULE_CONFIG",
    "MODULE_LOG",
    "MODULE_LOG_FORMAT",
    "MODULE_OPERATOR_TOKEN",
    "MODULE_NLB_TOKEN",
];
const DEMO_ORIGIN_VARS: &[&str] = &["DEMO_ORIGIN_LISTEN", "DEMO_ORIGIN_NAME"];

/// Checks of one container against the config it loaded.
pub(crate) fn check_workload(m: &Manifests, w: &Workload, r: &mut Report) {
    let (d, c, at) = (w.d, w.c, &w.field);
    let containers = std::slice::from_ref(c);
    if let Some(cmd) = c["command"].as_sequence() {
        let want = format!("/usr/local/bin/{}", w.program);
        if cmd.first().and_then(Value::as_str) != Some(want.as_str()) {
            r.bad(
                d,
                format!("{at}.command"),
                format!("the image's program is {want}"),
            );
        }
    }
    // Variables the program does not read are typos.
    let known: BTreeSet<&str> = match w.program {
        "nlb" => NLB_VARS
            .iter()
            .copied()
            .chain(nlb::config::ENV_OVERRIDES.iter().map(|(v, _)| *v))
            .chain(nlb::auth::tokens::ENV_TOKENS.iter().map(|(v, _)| *v))
            .chain([nlb::security::ENV_MODULE_CALL_TOKEN])
            .collect(),
        "alb" | "echo-module" => MODULE_VARS
            .iter()
            .copied()
            .chain(
                switchyard_sdk::config::ENV_OVERRIDES
                    .iter()
                    .map(|(v, _)| *v),
            )
            .chain([switchyard_sdk::config::ENV_TOKEN])
            .collect(),
        _ => DEMO_ORIGIN_VARS.iter().copied().collect(),
    };
    for e in seq(&c["env"]) {
        let name = e["name"].as_str().unwrap_or_default();
        if !known.contains(name) {
            r.bad(
                d,
                format!("{at}.env[{name}]"),
                format!("{} reads no such variable", w.program),
            );
        }
    }
    let Some(loaded) = &w.loaded else { return };
    // (what, listen address) the process binds; the admin or health port.
    let (listens, health, readiness_path, drain): (Vec<(String, String)>, String, &str, u64) =
        match loaded {
            Loaded::Nlb(cfg) => {
                let mut l = vec![
                    ("grpc.listen".to_string(), cfg.grpc.listen.clone()),
                    ("admin.listen".to_string(), cfg.admin.listen.clone()),
                ];
                l.extend(
                    cfg.listeners
                        .iter()
                        .map(|x| (format!("listeners[{}].bind", x.name), x.bind.clone())),
                );
                let grace = w
                    .env
                    .get("NLB_SHUTDOWN_GRACE_SECONDS")
                    .and_then(|g| g.parse().ok())
                    .unwrap_or(NLB_DEFAULT_SHUTDOWN_GRACE);
                (
                    l,
                    cfg.admin.listen.clone(),
                    "/readyz",
                    cfg.dataplane.drain_timeout_seconds.max(grace),
                )
            }
            Loaded::Module(cfg) => {
                let l = vec![
                    ("listen.grpc".to_string(), cfg.listen.grpc.clone()),
                    ("listen.data".to_string(), cfg.listen.data.clone()),
                    ("listen.admin".to_string(), cfg.listen.admin.clone()),
                ];
                (
                    l,
                    cfg.listen.admin.clone(),
                    "/readyz",
                    cfg.shutdown.drain_timeout_seconds,
                )
            }
            Loaded::Origin(listen) => (
                vec![("DEMO_ORIGIN_LISTEN".to_string(), listen.clone())],
                listen.clone(),
                "/healthz",
                0,
            ),
        };
    for (what, addr) in &listens {
        let ip_ok = addr
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_unspecified() || a.ip().to_string() == POD_IP);
        if !ip_ok {
            r.bad(
                d,
                format!("{at} config {what}"),
                format!("{addr}: not reachable from other pods or the kubelet; listen on 0.0.0.0"),
            );
        }
        let port = port_of(addr).unwrap_or(0);
        if container_port(containers, &Value::Number(port.into())).is_none() {
            r.bad(
                d,
                format!("{at}.ports"),
                format!("the config's {what} ({addr}) is not a container port"),
            );
        }
    }
    if let Loaded::Module(cfg) = loaded {
        for (name, addr) in [
            ("data", &cfg.listen.data),
            ("grpc", &cfg.listen.grpc),
            ("admin", &cfg.listen.admin),
        ] {
            let declared = container_port(containers, &Value::String(name.into()));
            if declared != port_of(addr) {
                r.bad(
                    d,
                    format!("{at}.ports[{name}]"),
                    format!(
                        "{}, but the config's listen.{name} is {addr}",
                        opt(declared)
                    ),
                );
            }
        }
        if w.env
            .fields
            .get("MODULE_ADVERTISE_HOST")
            .map(String::as_str)
            != Some("status.podIP")
        {
            r.bad(
                d,
                format!("{at}.env[MODULE_ADVERTISE_HOST]"),
                "must come from fieldRef status.podIP: the NLB connects to the pod's own IP",
            );
        }
    }
    // Probes: on the admin (health) port the config listens on.
    let health_port = port_of(&health).unwrap_or(0);
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", readiness_path),
    ] {
        let p = &c[probe];
        if p["httpGet"].is_null() {
            r.bad(
                d,
                format!("{at}.{probe}"),
                format!("missing: an httpGet of {path} on port {health_port}"),
            );
            continue;
        }
        let got = container_port(containers, &p["httpGet"]["port"]);
        if got != Some(health_port) {
            r.bad(
                d,
                format!("{at}.{probe}.httpGet.port"),
                format!(
                    "{} is container port {}, but the config {} loads serves health on {health}",
                    show(&p["httpGet"]["port"]),
                    opt(got),
                    w.program
                ),
            );
        }
        if p["httpGet"]["path"].as_str() != Some(path) {
            r.bad(
                d,
                format!("{at}.{probe}.httpGet.path"),
                format!("{} serves {path} for this", w.program),
            );
        }
    }
    let grace = d.pod()["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    if grace <= drain {
        r.bad(
            d,
            "terminationGracePeriodSeconds",
            format!(
                "{grace}: the drain takes up to {drain} s, so the kubelet would kill it mid-drain"
            ),
        );
    }
    if let Loaded::Nlb(cfg) = loaded {
        check_state_volume(m, w, cfg, r);
    }
}

/// The NLB's state file is on the claim, and one pod at a time mounts it.
fn check_state_volume(m: &Manifests, w: &Workload, cfg: &nlb::config::NlbConfig, r: &mut Report) {
    let d = w.d;
    let state = cfg.state_file.to_string_lossy().to_string();
    let at = format!("{} config state_file", w.field);
    let mount = deepest_mount(w.c, |mp| state.starts_with(&format!("{mp}/")));
    let Some(mount) = mount else {
        r.bad(
            d,
            &at,
            format!("{state} is on no volumeMount: the state would be lost at each restart"),
        );
        return;
    };
    let vname = mount["name"].as_str().unwrap_or_default();
    let volumes = seq(&d.pod()["volumes"]);
    let claim = named(volumes, vname)
        .and_then(|i| volumes[i]["persistentVolumeClaim"]["claimName"].as_str());
    let Some(claim) = claim else {
        r.bad(
            d,
            &at,
            format!("{state} is on volume {vname:?}, which is not a persistentVolumeClaim"),
        );
        return;
    };
    if mount["readOnly"].as_bool() == Some(true) {
        r.bad(d, &at, format!("{state} is on a read-only mount"));
    }
    // A ReadWriteOnce claim is mounted by one pod: one replica, and the old
    // pod gone before the new one starts.
    let rwo = m.get("PersistentVolumeClaim", claim).is_some_and(|pvc| {
        seq(&pvc.v["spec"]["accessModes"])
            .iter()
            .any(|a| matches!(a.as_str(), Some("ReadWriteOnce" | "ReadWriteOncePod")))
    });
    if rwo
        && (d.v["spec"]["replicas"].as_u64() != Some(1)
            || d.v["spec"]["strategy"]["type"].as_str() != Some("Recreate"))
    {
        r.bad(d, "spec.replicas/strategy", format!(
            "the NLB's state is on the ReadWriteOnce claim {claim}: replicas 1 and strategy Recreate"
        ));
    }
}
