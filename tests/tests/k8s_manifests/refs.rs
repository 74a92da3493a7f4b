//! References between objects: `kustomization.yaml` lists exactly the
//! files, everything is in the namespace, ConfigMaps and claims are used;
//! Services and PodDisruptionBudgets select one Deployment (and Services
//! target its ports), autoscalers name theirs.

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml_ng::Value;

use crate::model::{
    container_port, seq, show, strings, target_port, Manifests, Object, Report, NAMESPACE,
};

pub(crate) fn check_kustomization(m: &Manifests, r: &mut Report) {
    const K: &str = "kustomization.yaml";
    if m.kustomization["kind"].as_str() != Some("Kustomization") {
        r.file(K, "missing, or its kind is not Kustomization");
    }
    let listed: BTreeSet<String> = seq(&m.kustomization["resources"])
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    for f in listed.difference(&m.files) {
        r.file(
            K,
            format!("resources: {f} is listed but is not a YAML file in deploy/k8s"),
        );
    }
    for f in m.files.difference(&listed) {
        r.file(
            f,
            format!("not listed in {K} resources: kubectl apply -k would skip it"),
        );
    }
}

pub(crate) fn check_objects(m: &Manifests, r: &mut Report) {
    let mut seen = BTreeSet::new();
    for o in &m.objects {
        if o.kind.is_empty() || o.name.is_empty() || o.v["apiVersion"].as_str().is_none() {
            r.bad(o, "apiVersion/kind/metadata.name", "missing");
        }
        if !seen.insert((o.kind.clone(), o.name.clone())) {
            r.bad(
                o,
                "metadata.name",
                "another object of this kind has this name",
            );
        }
        let ns = o.v["metadata"]["namespace"].as_str();
        if o.kind == "Namespace" {
            if o.name != NAMESPACE {
                r.bad(
                    o,
                    "metadata.name",
                    format!("the stack's namespace is {NAMESPACE}"),
                );
            }
        } else if ns != Some(NAMESPACE) {
            r.bad(
                o,
                "metadata.namespace",
                format!("{ns:?}, not {NAMESPACE:?}"),
            );
        }
    }
    if m.get("Namespace", NAMESPACE).is_none() {
        r.file(
            "kustomization.yaml",
            format!("no Namespace {NAMESPACE} among the manifests"),
        );
    }
    // Every ConfigMap and claim is used by some pod.
    let mut used = BTreeSet::new();
    for d in m.of_kind("Deployment") {
        for v in seq(&d.pod()["volumes"]) {
            if let Some(cm) = v["configMap"]["name"].as_str() {
                used.insert(("ConfigMap", cm.to_string()));
            }
            if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
                used.insert(("PersistentVolumeClaim", claim.to_string()));
            }
        }
        for c in d.containers() {
            for e in seq(&c["env"]) {
                if let Some(cm) = e["valueFrom"]["configMapKeyRef"]["name"].as_str() {
                    used.insert(("ConfigMap", cm.to_string()));
                }
            }
            for e in seq(&c["envFrom"]) {
                if let Some(cm) = e["configMapRef"]["name"].as_str() {
                    used.insert(("ConfigMap", cm.to_string()));
                }
            }
        }
    }
    for kind in ["ConfigMap", "PersistentVolumeClaim"] {
        for o in m.of_kind(kind) {
            if !used.contains(&(kind, o.name.clone())) {
                r.bad(o, "metadata.name", "no Deployment uses it");
            }
        }
    }
}

/// The one Deployment whose pods `selector` (the spec.selector of `o`)
/// picks; else reports "`selector` selects `which(picked)`, not exactly
/// one".
fn one_deployment<'a>(
    m: &'a Manifests,
    o: &Object,
    selector: &BTreeMap<String, String>,
    r: &mut Report,
    which: impl FnOnce(&[&Object]) -> String,
) -> Option<&'a Object> {
    let picked = m.selected(selector);
    if let [d] = picked.as_slice() {
        return Some(d);
    }
    r.bad(
        o,
        "spec.selector",
        format!("{selector:?} selects {}, not exactly one", which(&picked)),
    );
    None
}

pub(crate) fn check_services(m: &Manifests, r: &mut Report) {
    for s in m.of_kind("Service") {
        let selector = strings(&s.v["spec"]["selector"]);
        let Some(d) = one_deployment(m, s, &selector, r, |picked| {
            let names: Vec<_> = picked.iter().map(|d| d.name.as_str()).collect();
            format!(
                "the pods of {} Deployments ({})",
                picked.len(),
                names.join(", ")
            )
        }) else {
            continue;
        };
        let ports = seq(&s.v["spec"]["ports"]);
        if ports.is_empty() {
            r.bad(s, "spec.ports", "none");
        }
        for p in ports {
            let pname = p["name"].as_str().unwrap_or("?");
            if ports.iter().filter(|x| x["name"] == p["name"]).count() > 1 {
                r.bad(
                    s,
                    format!("spec.ports[{pname}]"),
                    "two ports have this name",
                );
            }
            let target = target_port(p);
            if container_port(d.containers(), target).is_none() {
                r.bad(
                    s,
                    format!("spec.ports[{pname}].targetPort"),
                    format!(
                        "{} is not a container port of Deployment {}",
                        show(target),
                        d.name
                    ),
                );
            }
        }
    }
}

pub(crate) fn check_budgets_and_autoscalers(m: &Manifests, r: &mut Report) {
    let mut hpa_of: BTreeMap<String, &Object> = BTreeMap::new();
    for h in m.of_kind("HorizontalPodAutoscaler") {
        let spec = &h.v["spec"];
        let target = &spec["scaleTargetRef"];
        if h.v["apiVersion"].as_str() != Some("autoscaling/v2") {
            r.bad(h, "apiVersion", "use autoscaling/v2");
        }
        let name = target["name"].as_str().unwrap_or_default();
        let d = m.get("Deployment", name);
        if target["kind"].as_str() != Some("Deployment")
            || target["apiVersion"].as_str() != Some("apps/v1")
            || d.is_none()
        {
            r.bad(
                h,
                "spec.scaleTargetRef",
                format!("names no Deployment (apps/v1) {name:?}"),
            );
        }
        let (min, max) = (
            spec["minReplicas"].as_u64().unwrap_or(1),
            spec["maxReplicas"].as_u64().unwrap_or(0),
        );
        if min < 1 || min > max {
            r.bad(
                h,
                "spec.minReplicas/maxReplicas",
                format!("{min}..{max} is not a range"),
            );
        }
        let Some(d) = d else { continue };
        if hpa_of.insert(name.to_string(), h).is_some() {
            r.bad(
                h,
                "spec.scaleTargetRef",
                format!("Deployment {name} has two HPAs"),
            );
        }
        if !d.v["spec"]["replicas"].is_null() {
            r.bad(d, "spec.replicas", format!(
                "set, while HorizontalPodAutoscaler {} owns the count: every kubectl apply would reset it",
                h.name
            ));
        }
        for metric in seq(&spec["metrics"]) {
            let Some(resource) = metric["resource"]["name"].as_str() else {
                continue;
            };
            for c in d.containers() {
                if c["resources"]["requests"][resource].is_null() {
                    r.bad(h, "spec.metrics", format!(
                        "{resource} utilization needs a {resource} request on container {} of Deployment {}",
                        show(&c["name"]),
                        d.name
                    ));
                }
            }
        }
    }
    for p in m.of_kind("PodDisruptionBudget") {
        let spec = &p.v["spec"];
        let selector = strings(&spec["selector"]["matchLabels"]);
        let Some(d) = one_deployment(m, p, &selector, r, |picked| {
            format!("{} Deployments", picked.len())
        }) else {
            continue;
        };
        // The fewest replicas the Deployment runs.
        let fewest = match hpa_of.get(&d.name) {
            Some(h) => h.v["spec"]["minReplicas"].as_u64().unwrap_or(1),
            None => d.v["spec"]["replicas"].as_u64().unwrap_or(1),
        };
        match (&spec["minAvailable"], &spec["maxUnavailable"]) {
            (Value::Null, Value::Null)
            | (Value::Number(_) | Value::String(_), Value::Number(_) | Value::String(_)) => {
                r.bad(
                    p,
                    "spec",
                    "set exactly one of minAvailable and maxUnavailable",
                );
            }
            (Value::Number(n), Value::Null) if n.as_u64().unwrap_or(0) >= fewest => {
                r.bad(p, "spec.minAvailable", format!(
                    "{n} with {fewest} replica(s) of {} at the least: no node could ever be drained",
                    d.name
                ));
            }
            (Value::Null, Value::Number(n)) if n.as_u64() == Some(0) => {
                r.bad(p, "spec.maxUnavailable", "0: no node could ever be drained");
            }
            _ => {}
        }
    }
}
