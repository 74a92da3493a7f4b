//! The programs the containers run, and the configs they load: parsed with
//! the NLB's and the SDK's own loaders and validators (and the ALB's module
//! section), with the environment each Deployment sets.

use std::net::SocketAddr;

use serde_yaml_ng::Value;

use crate::container::{config_path, mounted_file, Env};
use crate::model::{Manifests, Object, Report};

/// The programs of the images: image `switchyard/<program>:<version>`,
/// entrypoint `/usr/local/bin/<program>`.
const PROGRAMS: &[&str] = &["nlb", "alb", "echo-module", "demo-origin"];
/// demo-origin's address without `DEMO_ORIGIN_LISTEN`
/// (tools/src/bin/demo-origin.rs).
const DEMO_ORIGIN_DEFAULT_LISTEN: &str = "0.0.0.0:8000";

/// What a container runs and the config it loaded.
pub(crate) struct Workload<'a> {
    pub(crate) d: &'a Object,
    pub(crate) c: &'a Value,
    pub(crate) field: String,
    pub(crate) program: &'static str,
    pub(crate) env: Env,
    pub(crate) loaded: Option<Loaded>,
}

pub(crate) enum Loaded {
    Nlb(nlb::config::NlbConfig),
    Module(switchyard_sdk::SdkConfig),
    Origin(String),
}

fn load_nlb(text: &str, env: &Env) -> Result<nlb::config::NlbConfig, Vec<String>> {
    let lookup = |k: &str| env.get(k);
    let all = |e: Vec<nlb::config::ConfigError>| -> Vec<String> {
        e.iter().map(ToString::to_string).collect()
    };
    let file = nlb::config::parse_sections(text).map_err(all)?;
    let config = nlb::config::merge(&file, &nlb::config::Sections::new(), &lookup).map_err(all)?;
    nlb::security::check_files(&config, &lookup).map_err(|e| vec![e.to_string()])?;
    Ok(config)
}

fn load_module(
    program: &str,
    text: &str,
    env: &Env,
) -> Result<switchyard_sdk::SdkConfig, Vec<String>> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("module.yaml");
    std::fs::write(&path, text).expect("write the config");
    let lookup = |k: &str| env.get(k);
    let config = switchyard_sdk::SdkConfig::load(Some(&path), &lookup)
        .map_err(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    if program == "alb" {
        alb::config::AlbConfig::from_section(config.module.clone())
            .map_err(|e| e.iter().map(|e| format!("module: {e}")).collect::<Vec<_>>())?;
    }
    switchyard_sdk::auth::ModuleAuth::new(config.auth.tokens_file.as_deref(), &lookup)
        .map_err(|e| vec![e])?;
    Ok(config)
}

/// Every container of every Deployment, with the config it loads (loaded
/// without the optional Secret and with it; each failure reported).
pub(crate) fn workloads<'a>(m: &'a Manifests, r: &mut Report) -> Vec<Workload<'a>> {
    let version = env!("CARGO_PKG_VERSION");
    let mut out = Vec::new();
    for d in m.of_kind("Deployment") {
        for c in d.containers() {
            let field = format!("containers[{}]", c["name"].as_str().unwrap_or("?"));
            let image = c["image"].as_str().unwrap_or_default();
            let program = image
                .strip_prefix("switchyard/")
                .and_then(|rest| rest.split_once(':'))
                .and_then(|(p, tag)| {
                    let p = PROGRAMS.iter().find(|known| **known == p)?;
                    (tag == version).then_some(*p)
                });
            let Some(program) = program else {
                r.bad(
                    d,
                    format!("{field}.image"),
                    format!(
                        "{image:?} is not switchyard/<{}>:{version} (the workspace version)",
                        PROGRAMS.join("|")
                    ),
                );
                continue;
            };
            let env = Env::of(m, c, false);
            let loaded = match load_program(m, d, c, program, &env) {
                Ok(l) => Some(l),
                Err(errors) => {
                    for e in errors {
                        r.bad(d, format!("{field} config"), e);
                    }
                    None
                }
            };
            // Creating the optional Secret must not break the start either
            // (every token rule applies to the values it gives).
            if loaded.is_some() {
                if let Err(errors) = load_program(m, d, c, program, &Env::of(m, c, true)) {
                    for e in errors {
                        r.bad(d, format!("{field} config with the Secret"), e);
                    }
                }
            }
            out.push(Workload {
                d,
                c,
                field,
                program,
                env,
                loaded,
            });
        }
    }
    out
}

fn load_program(
    m: &Manifests,
    d: &Object,
    c: &Value,
    program: &str,
    env: &Env,
) -> Result<Loaded, Vec<String>> {
    let file = |var: &str| {
        let path = config_path(c, env, var).ok_or_else(|| {
            vec![format!(
                "neither --config nor {var} is set: {program} would run on its defaults"
            )]
        })?;
        mounted_file(m, d, c, &path).map_err(|e| vec![e])
    };
    match program {
        "nlb" => load_nlb(&file("NLB_CONFIG")?, env).map(Loaded::Nlb),
        "alb" | "echo-module" => {
            load_module(program, &file("MODULE_CONFIG")?, env).map(Loaded::Module)
        }
        _ => {
            let listen = env
                .get("DEMO_ORIGIN_LISTEN")
                .unwrap_or_else(|| DEMO_ORIGIN_DEFAULT_LISTEN.into());
            match listen.parse::<SocketAddr>() {
                Ok(_) => Ok(Loaded::Origin(listen)),
                Err(e) => Err(vec![format!("DEMO_ORIGIN_LISTEN {listen:?}: {e}")]),
            }
        }
    }
}
