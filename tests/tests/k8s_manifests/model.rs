//! The manifests as objects: every YAML document under `deploy/k8s`, the
//! accessors the checks share, and the report they write to.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

pub(crate) const NAMESPACE: &str = "switchyard";
/// What `fieldRef: status.podIP` stands for in the checks.
pub(crate) const POD_IP: &str = "10.244.1.23";

#[derive(Debug, Clone)]
pub(crate) struct Object {
    pub(crate) file: String,
    pub(crate) kind: String,
    pub(crate) name: String,
    pub(crate) v: Value,
}

impl Object {
    pub(crate) fn at(&self) -> String {
        format!("{}: {}/{}", self.file, self.kind, self.name)
    }
    pub(crate) fn pod(&self) -> &Value {
        &self.v["spec"]["template"]["spec"]
    }
    pub(crate) fn containers(&self) -> &[Value] {
        seq(&self.pod()["containers"])
    }
    pub(crate) fn pod_labels(&self) -> BTreeMap<String, String> {
        strings(&self.v["spec"]["template"]["metadata"]["labels"])
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Manifests {
    /// YAML files under deploy/k8s other than kustomization.yaml, relative.
    pub(crate) files: BTreeSet<String>,
    pub(crate) kustomization: Value,
    pub(crate) objects: Vec<Object>,
}

impl Manifests {
    pub(crate) fn load(dir: &Path) -> Manifests {
        let mut paths = Vec::new();
        walk(dir, &mut paths);
        let mut m = Manifests {
            files: BTreeSet::new(),
            kustomization: Value::Null,
            objects: Vec::new(),
        };
        for path in paths {
            let rel = path
                .strip_prefix(dir)
                .expect("under the directory")
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{rel}: cannot read: {e}"));
            if rel == "kustomization.yaml" {
                m.kustomization = serde_yaml_ng::from_str(&text)
                    .unwrap_or_else(|e| panic!("{rel}: not YAML: {e}"));
                continue;
            }
            m.files.insert(rel.clone());
            for (i, doc) in documents(&text).into_iter().enumerate() {
                let v: Value = serde_yaml_ng::from_str(&doc)
                    .unwrap_or_else(|e| panic!("{rel}: document {}: not YAML: {e}", i + 1));
                if v.is_null() {
                    continue;
                }
                let text_of = |v: &Value| v.as_str().unwrap_or_default().to_string();
                m.objects.push(Object {
                    file: rel.clone(),
                    kind: text_of(&v["kind"]),
                    name: text_of(&v["metadata"]["name"]),
                    v,
                });
            }
        }
        m
    }

    pub(crate) fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Object> + 'a {
        self.objects.iter().filter(move |o| o.kind == kind)
    }

    pub(crate) fn get(&self, kind: &str, name: &str) -> Option<&Object> {
        self.objects
            .iter()
            .find(|o| o.kind == kind && o.name == name)
    }

    /// The Deployments whose pods `selector` picks.
    pub(crate) fn selected(&self, selector: &BTreeMap<String, String>) -> Vec<&Object> {
        self.of_kind("Deployment")
            .filter(|d| selects(selector, &d.pod_labels()))
            .collect()
    }

    /// A ConfigMap's value at `key`.
    pub(crate) fn config_map_value(&self, name: &str, key: &str) -> Option<String> {
        self.get("ConfigMap", name)?.v["data"][key]
            .as_str()
            .map(str::to_string)
    }
}

/// The YAML files under `dir`, sorted.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}

/// The documents of a multi-document YAML text (split at `---` lines).
fn documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().expect("one document at least");
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs
}

pub(crate) fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map_or(&[], |s| s.as_slice())
}

pub(crate) fn strings(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
        .collect()
}

pub(crate) fn selects(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

pub(crate) fn named(items: &[Value], name: &str) -> Option<usize> {
    items.iter().position(|i| i["name"].as_str() == Some(name))
}

/// The port of an `ip:port` or `host:port`.
pub(crate) fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}

/// A container port of `containers` given as a number or a port name.
pub(crate) fn container_port(containers: &[Value], port: &Value) -> Option<u16> {
    containers
        .iter()
        .flat_map(|c| seq(&c["ports"]))
        .find_map(|p| {
            let n = u16::try_from(p["containerPort"].as_u64()?).ok()?;
            let hit = match port {
                Value::Number(x) => x.as_u64() == Some(u64::from(n)),
                Value::String(s) => p["name"].as_str() == Some(s),
                _ => false,
            };
            hit.then_some(n)
        })
}

/// What a Service port targets: its `targetPort`, else its `port`.
pub(crate) fn target_port(p: &Value) -> &Value {
    if p["targetPort"].is_null() {
        &p["port"]
    } else {
        &p["targetPort"]
    }
}

/// A port, or "none".
pub(crate) fn opt<T: Display>(port: Option<T>) -> String {
    port.map_or_else(|| "none".to_string(), |p| p.to_string())
}

/// Listener binds as `name port, ...`.
pub(crate) fn binds(listeners: &BTreeMap<u16, &str>) -> String {
    let all: Vec<_> = listeners.iter().map(|(p, n)| format!("{n} {p}")).collect();
    all.join(", ")
}

pub(crate) fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// The problems found, each `file: Kind/name: field: what`.
#[derive(Debug, Default)]
pub(crate) struct Report(pub(crate) Vec<String>);

impl Report {
    pub(crate) fn bad(&mut self, o: &Object, field: impl Display, msg: impl Display) {
        self.0.push(format!("{}: {field}: {msg}", o.at()));
    }
    pub(crate) fn file(&mut self, file: &str, msg: impl Display) {
        self.0.push(format!("{file}: {msg}"));
    }
}
