//! The files a user runs the stack from agree with each other and with the
//! code: docker-compose.yml, the configs under deploy/compose and
//! deploy/local (loaded with the binaries' own loaders and validators), and
//! the README's table of ports and environment variables.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use nlb::config::{merge, read_file, Sections};
use serde_yaml_ng::Value;
use switchyard_sdk::SdkConfig;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

/// docker-compose.yml with its `<<:` merges applied.
fn compose() -> Value {
    let mut v: Value =
        serde_yaml_ng::from_str(&read("docker-compose.yml")).expect("docker-compose.yml");
    v.apply_merge().expect("docker-compose.yml merge keys");
    v
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let s = &compose["services"][name];
    assert!(!s.is_null(), "docker-compose.yml: no service {name:?}");
    s
}

fn environment(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        other => panic!("environment value {other:?}"),
                    };
                    (k.as_str().unwrap().to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `${VAR:-default}` as its default, the way compose reads it unset.
fn unset_default(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').expect("unclosed ${") + i;
        let inner = &rest[i + 2..end];
        out.push_str(inner.split_once(":-").map_or("", |(_, d)| d));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Mount target -> host file (relative to the repository), for bind mounts.
fn bind_mounts(service: &Value) -> BTreeMap<String, String> {
    service["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let parts: Vec<&str> = v.as_str()?.split(':').collect();
            parts[0].starts_with("./").then(|| {
                (
                    parts[1].to_string(),
                    parts[0].trim_start_matches("./").to_string(),
                )
            })
        })
        .collect()
}

/// The port a `["CMD", probe, "http://127.0.0.1:P/..."]` health check probes.
fn probe_port(service: &Value) -> u16 {
    let test = service["healthcheck"]["test"]
        .as_sequence()
        .expect("a health check");
    assert_eq!(
        test[0].as_str(),
        Some("CMD"),
        "exec form, no shell in the image"
    );
    assert_eq!(test[1].as_str(), Some("/usr/local/bin/switchyard-probe"));
    let url = test[2].as_str().unwrap();
    let authority = url.trim_start_matches("http://").split('/').next().unwrap();
    port_of(authority)
}

/// A module service's config, loaded as the SDK loads it in the container:
/// the file its MODULE_CONFIG names, with the service's environment.
fn module_config(compose: &Value, name: &str) -> SdkConfig {
    let svc = service(compose, name);
    let env = environment(svc);
    let in_container = env.get("MODULE_CONFIG").expect("MODULE_CONFIG");
    let file = bind_mounts(svc)
        .get(in_container)
        .cloned()
        .unwrap_or_else(|| panic!("{name}: MODULE_CONFIG {in_container} is not mounted"));
    let lookup = |var: &str| env.get(var).map(|v| unset_default(v));
    SdkConfig::load(Some(&root().join(&file)), &lookup).unwrap_or_else(|e| panic!("{file}: {e:?}"))
}

fn workspace_version() -> String {
    read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .map(|v| v.trim_end_matches('"').to_string())
        .expect("workspace version")
}

#[test]
fn the_compose_stack_is_consistent() {
    let compose = compose();
    let version = workspace_version();
    for (name, svc) in compose["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        let image = unset_default(svc["image"].as_str().unwrap());
        assert!(
            image.starts_with("switchyard/") && image.ends_with(&format!(":{version}")),
            "{name}: image {image} is not switchyard/*:{version}"
        );
        for (target, file) in bind_mounts(svc) {
            assert!(
                root().join(&file).is_file(),
                "{name}: mounts {file} at {target}, which does not exist"
            );
        }
    }

    // The NLB: its config, as it loads it, against what compose publishes
    // and probes.
    let nlb = service(&compose, "nlb");
    let env = environment(nlb);
    let file = bind_mounts(nlb)[&env["NLB_CONFIG"]].clone();
    let sections = read_file(&root().join(&file)).unwrap_or_else(|e| panic!("{file}: {e:?}"));
    let lookup = |var: &str| env.get(var).map(|v| unset_default(v));
    let config =
        merge(&sections, &Sections::new(), &lookup).unwrap_or_else(|e| panic!("{file}: {e:?}"));
    let mut listening: BTreeSet<u16> = config.listeners.iter().map(|l| port_of(&l.bind)).collect();
    listening.insert(port_of(&config.grpc.listen));
    listening.insert(port_of(&config.admin.listen));
    let published: BTreeSet<u16> = nlb["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            unset_default(p.as_str().unwrap())
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(
        published, listening,
        "the nlb service publishes other ports than {file} listens on"
    );
    assert_eq!(
        probe_port(nlb),
        port_of(&config.admin.listen),
        "nlb health check port"
    );
    // The state file is on the named volume.
    let state_dir = nlb["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str()?.strip_prefix("nlb-state:"))
        .next()
        .expect("the nlb-state volume is mounted");
    assert!(
        config.state_file.starts_with(state_dir),
        "state file {} is not on the nlb-state volume ({state_dir})",
        config.state_file.display()
    );
    assert!(
        !compose["volumes"]["nlb-state"].is_null(),
        "volume nlb-state is not declared"
    );

    // The modules: their configs validate, they reach the NLB by its
    // service name on its gRPC port, and are probed on their admin port.
    for module in ["alb", "echo"] {
        let c = module_config(&compose, module);
        assert_eq!(
            c.nlb.addr,
            format!("nlb:{}", port_of(&config.grpc.listen)),
            "{module}: nlb.addr"
        );
        assert_eq!(
            probe_port(service(&compose, module)),
            port_of(&c.listen.admin),
            "{module}: health check port"
        );
        assert!(
            service(&compose, module)["ports"].is_null(),
            "{module} must not publish ports (it scales)"
        );
        assert!(
            c.advertise_host.is_empty(),
            "{module}: a fixed advertise_host breaks --scale"
        );
    }
    let alb = module_config(&compose, "alb");
    let alb_module = alb::config::AlbConfig::from_section(alb.module.clone())
        .unwrap_or_else(|e| panic!("deploy/compose/alb.yaml module section: {e:?}"));
    assert!(
        alb.data.proxy_protocol,
        "the ALB should ask the NLB for PROXY v2"
    );

    // The ALB's origin is the origin service, on the port it listens on.
    let origin = service(&compose, "origin");
    let origin_port = port_of(&environment(origin)["DEMO_ORIGIN_LISTEN"]);
    assert_eq!(probe_port(origin), origin_port, "origin health check port");
    let endpoints: Vec<String> = alb_module
        .clusters
        .iter()
        .flat_map(|c| c.endpoints.iter().map(|e| e.address.clone()))
        .collect();
    assert_eq!(endpoints, vec![format!("origin:{origin_port}")]);
}

#[test]
fn the_local_stack_configs_validate_and_fit_together() {
    let sections = read_file(&root().join("deploy/local/nlb.yaml")).expect("deploy/local/nlb.yaml");
    let config = merge(&sections, &Sections::new(), &|_| None).expect("deploy/local/nlb.yaml");
    let none = |_: &str| None;
    let alb =
        SdkConfig::load(Some(&root().join("deploy/local/alb.yaml")), &none).expect("alb.yaml");
    let echo =
        SdkConfig::load(Some(&root().join("deploy/local/echo.yaml")), &none).expect("echo.yaml");
    alb::config::AlbConfig::from_section(alb.module.clone()).expect("alb.yaml module section");
    let mut ports = vec![port_of(&config.grpc.listen), port_of(&config.admin.listen)];
    ports.extend(config.listeners.iter().map(|l| port_of(&l.bind)));
    for c in [&alb, &echo] {
        assert_eq!(
            c.nlb.addr, config.grpc.listen,
            "modules reach the local NLB"
        );
        ports.extend([&c.listen.grpc, &c.listen.data, &c.listen.admin].map(|a| port_of(a)));
    }
    ports.push(8000); // the demo origin (scripts/up.sh)
    let unique: BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(
        unique.len(),
        ports.len(),
        "two local processes on one port: {ports:?}"
    );
    // scripts/up.sh checks exactly these ports before it starts anything.
    let up = read("scripts/up.sh");
    let checked: BTreeSet<u16> = up
        .lines()
        .find_map(|l| l.trim().strip_prefix("for port in "))
        .expect("up.sh's port check")
        .trim_end_matches("; do")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(
        checked, unique,
        "scripts/up.sh checks other ports than the local stack uses"
    );
}

/// Environment variable names the code reads: string literals with the
/// project's prefixes in the programs' sources (contract enum names aside).
fn variables_in_code() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for dir in ["nlb/src", "modules", "tools/src"] {
        for file in rust_files(&root().join(dir)) {
            let text = std::fs::read_to_string(&file).unwrap();
            for (i, _) in text.match_indices('"') {
                let rest = &text[i + 1..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                let quoted = rest[name.len()..].starts_with('"');
                let ours = ["NLB_", "NLBCTL_", "MODULE_", "DEMO_ORIGIN_"]
                    .iter()
                    .any(|p| name.starts_with(p) && name.len() > p.len());
                if quoted && ours && !name.starts_with("MODULE_TYPE_") {
                    found.insert(name);
                }
            }
        }
    }
    // ${VAR} in the compose file and the stack scripts.
    for file in ["docker-compose.yml", "scripts/up.sh", "scripts/down.sh"] {
        let text = read(file);
        for (i, _) in text.match_indices("${") {
            let name: String = text[i + 2..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            if name.starts_with("SWITCHYARD_") || name.starts_with("COMPOSE_") {
                found.insert(name);
            }
        }
    }
    found
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path
                .file_name()
                .is_some_and(|n| n != "tests" && n != "target")
            {
                out.extend(rust_files(&path));
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The README section between its two headings.
fn readme_section() -> String {
    let readme = read("README.md");
    let start = readme
        .find("## Ports and environment variables")
        .expect("README: no ports and environment section");
    let end = readme[start + 3..]
        .find("\n## ")
        .map_or(readme.len(), |i| i + start + 3);
    readme[start..end].to_string()
}

#[test]
fn the_readme_table_lists_every_variable_the_code_reads() {
    let section = readme_section();
    // Names in the first column of the variables table.
    let listed: BTreeSet<String> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('|').nth(1))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2).map(str::to_string))
        .filter(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    let in_code = variables_in_code();
    let missing: Vec<_> = in_code.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        "README's table lacks variables the code reads: {missing:?}"
    );
    // And nothing listed that nothing reads (RUST_LOG and HOSTNAME are read
    // through their libraries' and the system's names).
    let sources: String = ["nlb/src", "modules", "tools/src"]
        .iter()
        .flat_map(|d| rust_files(&root().join(d)))
        .map(|f| std::fs::read_to_string(f).unwrap())
        .chain(
            [
                "docker-compose.yml",
                "scripts/up.sh",
                "scripts/down.sh",
                ".env",
            ]
            .map(read),
        )
        .collect();
    for name in &listed {
        let known = name == "RUST_LOG" && sources.contains("try_from_default_env");
        assert!(
            known || sources.contains(name.as_str()),
            "README lists {name}, which nothing reads"
        );
    }
}

#[test]
fn the_readme_table_lists_every_port_of_the_stack() {
    let section = readme_section();
    let ports_table: Vec<&str> = section
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| `") && !l.starts_with("| component"))
        .collect();
    let mut expected = BTreeSet::new();
    for file in ["deploy/compose/nlb.yaml", "deploy/local/nlb.yaml"] {
        let config = merge(
            &read_file(&root().join(file)).unwrap(),
            &Sections::new(),
            &|_| None,
        )
        .unwrap();
        expected.insert(port_of(&config.grpc.listen));
        expected.insert(port_of(&config.admin.listen));
        expected.extend(config.listeners.iter().map(|l| port_of(&l.bind)));
    }
    let none = |_: &str| None;
    for file in [
        "deploy/compose/alb.yaml",
        "deploy/compose/echo.yaml",
        "deploy/local/alb.yaml",
        "deploy/local/echo.yaml",
    ] {
        let c = SdkConfig::load(Some(&root().join(file)), &none).unwrap();
        expected.extend([&c.listen.grpc, &c.listen.data, &c.listen.admin].map(|a| port_of(a)));
    }
    expected.insert(port_of(
        &environment(service(&compose(), "origin"))["DEMO_ORIGIN_LISTEN"],
    ));
    for port in expected {
        let p = port.to_string();
        assert!(
            ports_table
                .iter()
                .any(|row| row.split(|c: char| !c.is_ascii_digit()).any(|n| n == p)),
            "README's ports table lacks port {port}"
        );
    }
}
