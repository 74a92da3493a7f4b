//! What a container sees: its environment (ConfigMaps, Secrets, the
//! downward API) and the config files mounted from ConfigMaps.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use crate::model::{named, seq, strings, Manifests, Object, NAMESPACE, POD_IP};

/// A container's environment as the process would see it.
#[derive(Debug, Default, Clone)]
pub(crate) struct Env {
    pub(crate) vars: BTreeMap<String, String>,
    /// Variable -> (Secret, key).
    pub(crate) secrets: BTreeMap<String, (String, String)>,
    /// Variable -> field path of the downward API.
    pub(crate) fields: BTreeMap<String, String>,
}

impl Env {
    /// `with_secrets`: as if the optional Secret existed with every key.
    pub(crate) fn of(m: &Manifests, c: &Value, with_secrets: bool) -> Env {
        let mut env = Env::default();
        for from in seq(&c["envFrom"]) {
            let prefix = from["prefix"].as_str().unwrap_or_default();
            if let Some(cm) = from["configMapRef"]["name"].as_str() {
                for (k, v) in strings(
                    &m.get("ConfigMap", cm)
                        .map_or(Value::Null, |o| o.v["data"].clone()),
                ) {
                    env.vars.insert(format!("{prefix}{k}"), v);
                }
            }
        }
        for e in seq(&c["env"]) {
            let name = e["name"].as_str().unwrap_or_default().to_string();
            let from = &e["valueFrom"];
            if let Some(v) = e["value"].as_str() {
                env.vars.insert(name, v.to_string());
            } else if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
                let value = match path {
                    "status.podIP" => POD_IP,
                    "metadata.name" => "pod-0",
                    "metadata.namespace" => NAMESPACE,
                    _ => "placeholder",
                };
                env.fields.insert(name.clone(), path.to_string());
                env.vars.insert(name, value.to_string());
            } else if let Some(cm) = from["configMapKeyRef"]["name"].as_str() {
                let key = from["configMapKeyRef"]["key"].as_str().unwrap_or_default();
                if let Some(v) = m.config_map_value(cm, key) {
                    env.vars.insert(name, v);
                }
            } else if let Some(secret) = from["secretKeyRef"]["name"].as_str() {
                let key = from["secretKeyRef"]["key"].as_str().unwrap_or_default();
                if with_secrets {
                    // One value per key, long enough for every token rule.
                    env.vars
                        .insert(name.clone(), format!("{secret}.{key}.0123456789abcdef"));
                }
                env.secrets
                    .insert(name, (secret.to_string(), key.to_string()));
            }
        }
        env
    }

    pub(crate) fn get(&self, var: &str) -> Option<String> {
        self.vars.get(var).cloned()
    }
}

/// The config file a container loads: `--config FILE`, else `var`.
pub(crate) fn config_path(c: &Value, env: &Env, var: &str) -> Option<String> {
    let args: Vec<&str> = seq(&c["args"]).iter().filter_map(Value::as_str).collect();
    for (i, a) in args.iter().enumerate() {
        if *a == "--config" {
            return args.get(i + 1).map(|s| s.to_string());
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.to_string());
        }
    }
    env.get(var)
}

/// A volumeMount's mountPath, without a trailing slash.
fn mount_path(mount: &Value) -> &str {
    mount["mountPath"]
        .as_str()
        .unwrap_or_default()
        .trim_end_matches('/')
}

/// The volumeMount of container `c` with the longest mountPath that `holds`
/// accepts (given the mountPath without a trailing slash).
pub(crate) fn deepest_mount(c: &Value, holds: impl Fn(&str) -> bool) -> Option<&Value> {
    seq(&c["volumeMounts"])
        .iter()
        .filter(|mnt| holds(mount_path(mnt)))
        .max_by_key(|mnt| mnt["mountPath"].as_str().unwrap_or_default().len())
}

/// The text of the file at `path` in container `c`: the ConfigMap key
/// mounted there.
pub(crate) fn mounted_file(
    m: &Manifests,
    d: &Object,
    c: &Value,
    path: &str,
) -> Result<String, String> {
    let mount = deepest_mount(c, |mp| path == mp || path.starts_with(&format!("{mp}/")))
        .ok_or_else(|| format!("{path} is on no volumeMount of the container"))?;
    let mount_path = mount_path(mount);
    let volume_name = mount["name"].as_str().unwrap_or_default();
    let volumes = seq(&d.pod()["volumes"]);
    let volume = named(volumes, volume_name)
        .map(|i| &volumes[i])
        .ok_or_else(|| format!("{path}: volume {volume_name:?} does not exist"))?;
    let cm = volume["configMap"]["name"]
        .as_str()
        .ok_or_else(|| format!("{path} is on volume {volume_name:?}, which is not a configMap"))?;
    let rel = match mount["subPath"].as_str() {
        Some(sub) if path == mount_path => sub.to_string(),
        Some(_) => {
            return Err(format!(
                "{path}: the subPath mount at {mount_path} is a file"
            ))
        }
        None => path[mount_path.len()..].trim_start_matches('/').to_string(),
    };
    let key = match volume["configMap"]["items"].as_sequence() {
        Some(items) => items
            .iter()
            .find(|i| i["path"].as_str() == Some(rel.as_str()))
            .and_then(|i| i["key"].as_str())
            .ok_or_else(|| format!("{path}: no item of volume {volume_name:?} has path {rel:?}"))?
            .to_string(),
        None => rel,
    };
    m.config_map_value(cm, &key)
        .ok_or_else(|| format!("{path}: ConfigMap {cm:?} has no key {key:?}"))
}
