//! `config show [SECTION]` (GetNLBConfig), `config validate|apply SECTION
//! FILE` (UpdateNLBConfig, with the SHA-256 checksum of the data).

use std::path::Path;

use serde_yaml_ng::{Mapping, Value};
use shared_types::pb;

use crate::control::sha256_hex;
use crate::ctl::client::Ctl;
use crate::ctl::exit::{CtlError, Exit};
use crate::ctl::input;
use crate::ctl::json;
use crate::ctl::output::{when, Out};

fn header(c: &pb::ConfigUpdate) -> String {
    let meta = |k: &str| c.metadata.get(k).map_or("", String::as_str);
    let restart = if meta("requires_restart") == "true" {
        "; restart to change"
    } else {
        ""
    };
    format!(
        "# {} (source: {}, updated {}{restart})\n",
        c.config_type,
        if meta("source").is_empty() {
            "-"
        } else {
            meta("source")
        },
        when(c.updated_at.as_ref())
    )
}

/// One section as YAML: alone, its value as the NLB sent it; among all, as
/// `name: value`, so the whole output is a valid config file.
fn render_sections(configs: &[pb::ConfigUpdate], one: bool) -> Result<String, CtlError> {
    let mut out = String::new();
    for c in configs {
        let text = String::from_utf8_lossy(&c.config_data);
        out.push_str(&header(c));
        if one {
            out.push_str(&text);
        } else {
            let value: Value = serde_yaml_ng::from_str(&text).map_err(|e| {
                CtlError::Other(format!(
                    "config show: section {} is not YAML: {e}",
                    c.config_type
                ))
            })?;
            let mut m = Mapping::new();
            m.insert(Value::String(c.config_type.clone()), value);
            let yaml = serde_yaml_ng::to_string(&m)
                .map_err(|e| CtlError::Other(format!("config show: {e}")))?;
            out.push_str(&yaml);
        }
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

pub(super) async fn show(
    ctl: &Ctl,
    out: &mut Out,
    section: Option<&str>,
) -> Result<Exit, CtlError> {
    let req = pb::GetNlbConfigRequest {
        config_type: section.unwrap_or_default().to_string(),
    };
    let what = match section {
        Some(s) => format!("config show {s}"),
        None => "config show".to_string(),
    };
    let resp = ctl
        .call(
            &what,
            req,
            |mut c, r| async move { c.get_nlb_config(r).await },
        )
        .await?;
    if out.json() {
        out.document(&json::nlb_config(&resp))?;
    } else {
        out.text(&render_sections(&resp.configs, section.is_some())?)?;
    }
    Ok(Exit::Ok)
}

/// The request for a section: `checksum` is the lowercase hex SHA-256 of
/// the data, as the control API documents.
fn section_update(section: &str, data: Vec<u8>, validate_only: bool) -> pb::UpdateNlbConfigRequest {
    pb::UpdateNlbConfigRequest {
        config: Some(pb::ConfigUpdate {
            config_id: String::new(),
            config_type: section.to_string(),
            checksum: sha256_hex(&data),
            config_data: data,
            updated_at: None,
            metadata: Default::default(),
        }),
        validate_only,
        restart_required: false,
    }
}

pub(super) async fn update(
    ctl: &Ctl,
    out: &mut Out,
    section: &str,
    file: &Path,
    validate_only: bool,
) -> Result<Exit, CtlError> {
    let verb = if validate_only { "validate" } else { "apply" };
    let what = format!("config {verb} {section} {}", input::display_name(file));
    let req = section_update(section, input::section_file(file)?, validate_only);
    let resp = ctl
        .call(&what, req, |mut c, r| async move {
            c.update_nlb_config(r).await
        })
        .await?;
    if out.json() {
        out.document(&json::update_config(&resp))?;
    }
    if !resp.success || !resp.validation_passed {
        let mut problems = resp.validation_errors.clone();
        if problems.is_empty() {
            problems.push(
                resp.error
                    .as_ref()
                    .map_or_else(|| resp.message.clone(), |e| e.message.clone()),
            );
        }
        return Err(CtlError::Rejected { what, problems });
    }
    if !out.json() {
        // The message says when the change waits for a restart.
        out.text(&resp.message)?;
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_carry_the_sha256_of_their_data() {
        let req = section_update("routing", b"sticky: true\n".to_vec(), true);
        let c = req.config.unwrap();
        assert_eq!(c.config_type, "routing");
        // printf 'sticky: true\n' | sha256sum
        assert_eq!(
            c.checksum,
            "d3c9d67ccb3e1557b7d439eb4d8f1c66c2bdef8c1820ddf7c867cbcff576bd25"
        );
        assert!(req.validate_only);
    }

    #[test]
    fn all_sections_make_one_config_file() {
        let section = |name: &str, data: &str| pb::ConfigUpdate {
            config_type: name.into(),
            config_data: data.as_bytes().to_vec(),
            ..Default::default()
        };
        let text = render_sections(
            &[
                section("state_file", "nlb.state.json\n"),
                section("health", "active_checks: true\n"),
            ],
            false,
        )
        .unwrap();
        let doc: serde_yaml_ng::Mapping = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(doc["state_file"].as_str(), Some("nlb.state.json"));
        assert_eq!(doc["health"]["active_checks"].as_bool(), Some(true));
        assert!(
            text.starts_with("# state_file (source: -, updated -)\n"),
            "{text}"
        );
    }
}
