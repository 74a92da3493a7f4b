//! References between workloads, through their loaded configs: the
//! Services in front of the NLB, the modules' NLB address, the ALB's
//! origins, echo's routes, the tokens both sides share.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{
    binds, container_port, named, opt, port_of, selects, seq, show, strings, target_port,
    Manifests, Object, Report, NAMESPACE,
};
use crate::programs::{Loaded, Workload};

/// Tokens that must come from one Secret key on both sides: the NLB's
/// variable, then the modules'.
const TOKEN_PAIRS: &[(&str, &str)] = &[
    ("NLB_MODULE_TOKEN", "MODULE_TOKEN"),
    ("NLB_MODULE_CALL_TOKEN", "MODULE_NLB_TOKEN"),
];

/// The Service a cluster-local `host` names: `svc` or `svc.switchyard`,
/// or `svc.NS.svc[.cluster.local]` (another namespace is an error). `None`
/// for anything else (an IP address, an outside name).
fn service_of<'a>(m: &'a Manifests, host: &str) -> Option<Result<&'a Object, String>> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let in_cluster = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"));
    let svc = match in_cluster {
        Some(rest) => {
            let (svc, ns) = rest.split_once('.')?;
            if ns != NAMESPACE {
                return Some(Err(format!("{host} is in namespace {ns}, not {NAMESPACE}")));
            }
            svc
        }
        None if !host.contains('.') => host,
        None => host.strip_suffix(&format!(".{NAMESPACE}"))?,
    };
    let service = m.get("Service", svc);
    Some(service.ok_or_else(|| format!("{host}: there is no Service {svc}")))
}

/// The Service port `port` of `s` and the container port it targets.
fn service_port(m: &Manifests, s: &Object, port: u16) -> Option<u16> {
    let p = seq(&s.v["spec"]["ports"])
        .iter()
        .find(|p| p["port"].as_u64() == Some(u64::from(port)))?;
    let target = target_port(p);
    let selector = strings(&s.v["spec"]["selector"]);
    let picked = m.selected(&selector);
    container_port(picked.first()?.containers(), target)
}

/// References between workloads: the Services in front of the NLB, the
/// modules' NLB address, the ALB's origins, echo's routes, shared tokens.
pub(crate) fn check_across(m: &Manifests, ws: &[Workload], r: &mut Report) {
    let nlbs: Vec<_> = ws.iter().filter(|w| w.program == "nlb").collect();
    let [nlb_w] = nlbs.as_slice() else {
        r.file(
            "kustomization.yaml",
            format!("{} containers run switchyard/nlb, not one", nlbs.len()),
        );
        return;
    };
    let Some(Loaded::Nlb(cfg)) = &nlb_w.loaded else {
        return;
    };
    let grpc = port_of(&cfg.grpc.listen).unwrap_or(0);
    let admin = port_of(&cfg.admin.listen).unwrap_or(0);
    let listeners: BTreeMap<u16, &str> = cfg
        .listeners
        .iter()
        .map(|l| (port_of(&l.bind).unwrap_or(0), l.name.as_str()))
        .collect();
    let selects_nlb =
        |s: &Object| selects(&strings(&s.v["spec"]["selector"]), &nlb_w.d.pod_labels());

    // The public Service: exactly the listeners.
    match m.get("Service", "nlb") {
        None => r.file("nlb.yaml", "no Service nlb (the public LoadBalancer)"),
        Some(s) => {
            if s.v["spec"]["type"].as_str() != Some("LoadBalancer") {
                r.bad(s, "spec.type", "the NLB's public Service is a LoadBalancer");
            }
            if !selects_nlb(s) {
                r.bad(s, "spec.selector", "does not select the NLB's pods");
            }
            let mut exposed = BTreeSet::new();
            for p in seq(&s.v["spec"]["ports"]) {
                let port = u16::try_from(p["port"].as_u64().unwrap_or(0)).unwrap_or(0);
                match service_port(m, s, port) {
                    Some(t) if listeners.contains_key(&t) => {
                        exposed.insert(t);
                    }
                    t => r.bad(s, format!("spec.ports[{}]", show(&p["name"])), format!(
                        "targets container port {}, which is no listener bind of the NLB's config ({})",
                        opt(t),
                        binds(&listeners)
                    )),
                }
            }
            for (port, name) in &listeners {
                if !exposed.contains(port) {
                    r.bad(
                        s,
                        "spec.ports",
                        format!("the NLB's listener {name} (port {port}) is not exposed"),
                    );
                }
            }
        }
    }
    // The in-cluster Service: gRPC and admin.
    let control = m.get("Service", "nlb-control");
    match control {
        None => r.file(
            "nlb.yaml",
            "no Service nlb-control (the control API for modules)",
        ),
        Some(s) => {
            if !selects_nlb(s) {
                r.bad(s, "spec.selector", "does not select the NLB's pods");
            }
            for (pname, want, key) in [
                ("grpc", grpc, "grpc.listen"),
                ("admin", admin, "admin.listen"),
            ] {
                let ports = seq(&s.v["spec"]["ports"]);
                let got = named(ports, pname)
                    .and_then(|i| ports[i]["port"].as_u64())
                    .and_then(|p| service_port(m, s, u16::try_from(p).ok()?));
                if got != Some(want) {
                    r.bad(
                        s,
                        format!("spec.ports[{pname}]"),
                        format!(
                            "targets container port {}, but the NLB's {key} port is {want}",
                            opt(got)
                        ),
                    );
                }
            }
        }
    }
    let control_grpc = control.and_then(|s| {
        let ports = seq(&s.v["spec"]["ports"]);
        named(ports, "grpc").and_then(|i| ports[i]["port"].as_u64())
    });

    for w in ws {
        let Some(Loaded::Module(mc)) = &w.loaded else {
            continue;
        };
        let (d, at) = (w.d, format!("{} config nlb.addr", w.field));
        let Some((host, port)) = switchyard_sdk::config::split_host_port(&mc.nlb.addr) else {
            continue;
        };
        match service_of(m, host) {
            None => r.bad(
                d,
                &at,
                format!("{} is not a Service of the stack", mc.nlb.addr),
            ),
            Some(Err(e)) => r.bad(d, &at, e),
            Some(Ok(s)) => {
                if !selects_nlb(s) {
                    r.bad(
                        d,
                        &at,
                        format!("Service {} does not select the NLB", s.name),
                    );
                }
                if control_grpc != Some(u64::from(port)) {
                    r.bad(
                        d,
                        &at,
                        format!(
                            "port {port} is not the nlb-control Service's grpc port ({})",
                            opt(control_grpc)
                        ),
                    );
                }
                if port != grpc {
                    r.bad(
                        d,
                        &at,
                        format!("port {port} is not the NLB's grpc.listen port ({grpc})"),
                    );
                }
                match service_port(m, s, port) {
                    Some(t) if t == grpc => {}
                    t => r.bad(d, &at, format!(
                        "Service {} port {port} reaches container port {}, not the NLB's gRPC port {grpc}",
                        s.name,
                        opt(t),
                    )),
                }
            }
        }
        // The ALB's endpoints that name Services: their ports exist.
        for cluster in seq(&mc.module["clusters"]) {
            for ep in seq(&cluster["endpoints"]) {
                let addr = ep["address"].as_str().unwrap_or_default();
                let Some((host, port)) = switchyard_sdk::config::split_host_port(addr) else {
                    continue;
                };
                let field = format!(
                    "{} config module.clusters[{}]",
                    w.field,
                    show(&cluster["name"])
                );
                match service_of(m, host) {
                    Some(Err(e)) => r.bad(d, &field, e),
                    Some(Ok(s)) if service_port(m, s, port).is_none() => {
                        let msg = format!("{addr}: Service {} has no port {port}", s.name);
                        r.bad(d, &field, format!("{msg} that reaches a container port"));
                    }
                    _ => {}
                }
            }
        }
        // Routes a module announces on a port: the port is a listener's.
        for route in seq(&mc.module["routes"]) {
            let Some(port) = route["destination_port"].as_u64() else {
                continue;
            };
            if port != 0 && !u16::try_from(port).is_ok_and(|p| listeners.contains_key(&p)) {
                r.bad(
                    d,
                    format!(
                        "{} config module.routes[{}]",
                        w.field,
                        show(&route["route_id"])
                    ),
                    format!(
                        "destination_port {port} is no listener of the NLB's config ({})",
                        binds(&listeners)
                    ),
                );
            }
        }
        // Tokens the two sides must share.
        for (nlb_var, module_var) in TOKEN_PAIRS {
            let a = nlb_w.env.secrets.get(*nlb_var);
            let b = w.env.secrets.get(*module_var);
            if (a.is_some() || b.is_some()) && a != b {
                r.bad(d, format!("{}.env[{module_var}]", w.field), format!(
                    "from {b:?}, but the NLB's {nlb_var} is from {a:?}: the same Secret key on both sides"
                ));
            }
        }
    }
}
