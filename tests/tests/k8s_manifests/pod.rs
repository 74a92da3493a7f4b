//! One Deployment's pod: its selector, volumes, mounts, env references,
//! resources, security context and probe ports.

use serde_yaml_ng::Value;

use crate::model::{container_port, named, selects, seq, show, strings, Manifests, Object, Report};

/// The uid and gid the images run as.
const IMAGE_USER: u64 = 65532;

pub(crate) fn check_pod(m: &Manifests, d: &Object, r: &mut Report) {
    let selector = &d.v["spec"]["selector"];
    let match_labels = strings(&selector["matchLabels"]);
    if !selector["matchExpressions"].is_null() {
        r.bad(
            d,
            "spec.selector.matchExpressions",
            "not supported by this check: use matchLabels",
        );
    }
    if !selects(&match_labels, &d.pod_labels()) {
        r.bad(
            d,
            "spec.selector.matchLabels",
            format!(
                "{match_labels:?} does not match the pod template's labels {:?}",
                d.pod_labels()
            ),
        );
    }
    let pod = d.pod();
    let volumes = seq(&pod["volumes"]);
    let mut pvc_mounted = false;
    for (i, v) in volumes.iter().enumerate() {
        let vname = v["name"].as_str().unwrap_or("?");
        let at = format!("volumes[{vname}]");
        if named(volumes, vname) != Some(i) {
            r.bad(d, &at, "two volumes have this name");
        }
        if let Some(cm) = v["configMap"]["name"].as_str() {
            let optional = v["configMap"]["optional"].as_bool() == Some(true);
            match m.get("ConfigMap", cm) {
                None if !optional => r.bad(d, &at, format!("ConfigMap {cm:?} does not exist")),
                None => {}
                Some(o) => {
                    for item in seq(&v["configMap"]["items"]) {
                        let key = item["key"].as_str().unwrap_or_default();
                        if o.v["data"][key].is_null() {
                            r.bad(
                                d,
                                format!("{at}.configMap.items"),
                                format!("ConfigMap {cm:?} has no key {key:?}"),
                            );
                        }
                    }
                }
            }
        }
        if let Some(s) = v["secret"]["secretName"].as_str() {
            if m.get("Secret", s).is_none() && v["secret"]["optional"].as_bool() != Some(true) {
                r.bad(
                    d,
                    &at,
                    format!("Secret {s:?} is not among the manifests: mark it optional"),
                );
            }
        }
        if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
            pvc_mounted = true;
            if m.get("PersistentVolumeClaim", claim).is_none() {
                r.bad(
                    d,
                    &at,
                    format!("PersistentVolumeClaim {claim:?} does not exist"),
                );
            }
        }
    }
    let pod_sc = &pod["securityContext"];
    if pvc_mounted && pod_sc["fsGroup"].as_u64() != Some(IMAGE_USER) {
        r.bad(
            d,
            "securityContext.fsGroup",
            format!("must be {IMAGE_USER} so the image's user can write the volume"),
        );
    }
    let containers = d.containers();
    if containers.is_empty() {
        r.bad(d, "containers", "none");
    }
    for c in containers {
        let cname = c["name"].as_str().unwrap_or("?");
        let at = format!("containers[{cname}]");
        if containers.iter().filter(|x| x["name"] == c["name"]).count() > 1 {
            r.bad(d, &at, "two containers have this name");
        }
        for mnt in seq(&c["volumeMounts"]) {
            let v = mnt["name"].as_str().unwrap_or_default();
            if named(volumes, v).is_none() {
                r.bad(
                    d,
                    format!("{at}.volumeMounts[{v}]"),
                    "names no volume of the pod",
                );
            }
        }
        check_env_refs(m, d, c, &at, r);
        check_resources(d, c, &at, r);
        // Security: the namespace enforces the restricted standard.
        let eff = |key: &str| {
            let own = &c["securityContext"][key];
            if own.is_null() {
                pod_sc[key].clone()
            } else {
                own.clone()
            }
        };
        let sc = &c["securityContext"];
        for (key, ok) in [
            ("runAsNonRoot", eff("runAsNonRoot").as_bool() == Some(true)),
            ("runAsUser", eff("runAsUser").as_u64() == Some(IMAGE_USER)),
            (
                "seccompProfile",
                eff("seccompProfile")["type"].as_str() == Some("RuntimeDefault"),
            ),
            (
                "allowPrivilegeEscalation",
                sc["allowPrivilegeEscalation"].as_bool() == Some(false),
            ),
            (
                "readOnlyRootFilesystem",
                sc["readOnlyRootFilesystem"].as_bool() == Some(true),
            ),
            (
                "capabilities.drop",
                seq(&sc["capabilities"]["drop"])
                    .iter()
                    .any(|v| v.as_str() == Some("ALL")),
            ),
        ] {
            if !ok {
                r.bad(d, format!("{at}.securityContext.{key}"), format!(
                    "must be set (non-root uid {IMAGE_USER}, no escalation, read-only root, drop ALL, RuntimeDefault seccomp)"
                ));
            }
        }
        if c["imagePullPolicy"].as_str() == Some("Always") {
            r.bad(
                d,
                format!("{at}.imagePullPolicy"),
                "Always: the images are loaded into the cluster, not pulled",
            );
        }
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let p = &c[probe];
            let port = [
                &p["httpGet"]["port"],
                &p["tcpSocket"]["port"],
                &p["grpc"]["port"],
            ]
            .into_iter()
            .find(|v| !v.is_null());
            if let Some(port) = port {
                if container_port(std::slice::from_ref(c), port).is_none() {
                    r.bad(
                        d,
                        format!("{at}.{probe}"),
                        format!("port {} is not a port of this container", show(port)),
                    );
                }
            }
        }
    }
}

fn check_env_refs(m: &Manifests, d: &Object, c: &Value, at: &str, r: &mut Report) {
    for e in seq(&c["env"]) {
        let name = e["name"].as_str().unwrap_or("?");
        let field = format!("{at}.env[{name}]");
        let from = &e["valueFrom"];
        if let Some(cm) = from["configMapKeyRef"]["name"].as_str() {
            let key = from["configMapKeyRef"]["key"].as_str().unwrap_or_default();
            let optional = from["configMapKeyRef"]["optional"].as_bool() == Some(true);
            if m.config_map_value(cm, key).is_none() && !optional {
                r.bad(d, field, format!("ConfigMap {cm:?} has no key {key:?}"));
            }
        } else if let Some(s) = from["secretKeyRef"]["name"].as_str() {
            let key = from["secretKeyRef"]["key"].as_str().unwrap_or_default();
            let optional = from["secretKeyRef"]["optional"].as_bool() == Some(true);
            let exists = m
                .get("Secret", s)
                .is_some_and(|o| !o.v["data"][key].is_null() || !o.v["stringData"][key].is_null());
            if !optional && !exists {
                r.bad(
                    d,
                    field,
                    format!(
                        "Secret {s:?} key {key:?} is not among the manifests: mark it optional"
                    ),
                );
            }
        }
    }
    for from in seq(&c["envFrom"]) {
        if let Some(cm) = from["configMapRef"]["name"].as_str() {
            if m.get("ConfigMap", cm).is_none()
                && from["configMapRef"]["optional"].as_bool() != Some(true)
            {
                r.bad(
                    d,
                    format!("{at}.envFrom"),
                    format!("ConfigMap {cm:?} does not exist"),
                );
            }
        }
    }
}

fn check_resources(d: &Object, c: &Value, at: &str, r: &mut Report) {
    for (bound, kind) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "cpu"),
        ("limits", "memory"),
    ] {
        if c["resources"][bound][kind].is_null() {
            r.bad(d, format!("{at}.resources.{bound}.{kind}"), "missing");
        }
    }
}
