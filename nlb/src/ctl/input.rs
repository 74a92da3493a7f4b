//! Input files: routes for `routes apply`, sections for `config
//! validate|apply`. Every problem names the file (and, for routes, the entry
//! and field); a missing or invalid file is exit 6.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde_yaml_ng::Value;
use shared_types::pb;

use super::exit::CtlError;
use crate::config::{check_routes, RouteConfig};

/// How a file is named in messages (`-` is stdin).
pub fn display_name(path: &Path) -> String {
    if path == Path::new("-") {
        "<stdin>".to_string()
    } else {
        path.display().to_string()
    }
}

/// The file's text (`-` reads stdin).
pub fn read_text(path: &Path) -> Result<String, CtlError> {
    let name = display_name(path);
    let bytes = if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| CtlError::input(&name, format!("cannot read it: {e}")))?;
        buf
    } else {
        std::fs::read(path).map_err(|e| CtlError::input(&name, format!("cannot read it: {e}")))?
    };
    String::from_utf8(bytes).map_err(|_| CtlError::input(&name, "is not UTF-8 text"))
}

/// A config section file: its bytes as given, after checking they parse as
/// YAML (or JSON). The NLB validates the content.
pub fn section_file(path: &Path) -> Result<Vec<u8>, CtlError> {
    let text = read_text(path)?;
    serde_yaml_ng::from_str::<Value>(&text)
        .map_err(|e| CtlError::input(display_name(path), format!("not valid YAML or JSON: {e}")))?;
    Ok(text.into_bytes())
}

/// Parses a routes file: a YAML (or JSON) list of routes in the shape of the
/// config's `routes:` entries, or a mapping with a `routes:` key (other keys
/// ignored, so a config file works too). An empty file is no routes.
pub fn parse_routes(text: &str, name: &str) -> Result<Vec<RouteConfig>, CtlError> {
    let doc: Value = serde_yaml_ng::from_str(text)
        .map_err(|e| CtlError::input(name, format!("not valid YAML: {e}")))?;
    let list = match doc {
        Value::Null => return Ok(Vec::new()),
        Value::Sequence(s) => s,
        Value::Mapping(mut m) => match m.remove("routes") {
            Some(Value::Sequence(s)) => s,
            Some(Value::Null) => return Ok(Vec::new()),
            Some(_) => return Err(CtlError::input(name, "routes: must be a list of routes")),
            None => {
                return Err(CtlError::input(
                    name,
                    "expected a list of routes, or a mapping with a `routes:` key",
                ))
            }
        },
        _ => {
            return Err(CtlError::input(
                name,
                "expected a list of routes, or a mapping with a `routes:` key",
            ))
        }
    };
    let mut routes = Vec::with_capacity(list.len());
    let mut problems = Vec::new();
    for (i, entry) in list.into_iter().enumerate() {
        match serde_yaml_ng::from_value::<RouteConfig>(entry) {
            Ok(r) => routes.push(r),
            Err(e) => problems.push(format!("routes[{i}]: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(routes)
    } else {
        Err(CtlError::Input {
            path: name.to_string(),
            problems,
        })
    }
}

/// Checks routes as the NLB would, except whether a named `backend` pool
/// exists (only the NLB knows its pools; it checks that).
pub fn check_locally(routes: &[RouteConfig], name: &str) -> Result<(), CtlError> {
    let pools: BTreeMap<String, Vec<String>> = routes
        .iter()
        .filter_map(|r| r.metadata.get("backend"))
        .map(|b| (b.clone(), Vec::new()))
        .collect();
    let mut errors = Vec::new();
    check_routes(routes, &pools, &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CtlError::Input {
            path: name.to_string(),
            problems: errors.iter().map(ToString::to_string).collect(),
        })
    }
}

/// Reads, parses and checks a routes file; the routes in the contract's form.
pub fn routes_file(path: &Path) -> Result<Vec<pb::Route>, CtlError> {
    let name = display_name(path);
    let text = read_text(path)?;
    let routes = parse_routes(&text, &name)?;
    check_locally(&routes, &name)?;
    Ok(routes.iter().map(RouteConfig::to_proto).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(e: CtlError) -> Vec<String> {
        match e {
            CtlError::Input { problems, .. } => problems,
            other => panic!("expected an input error, got {other:?}"),
        }
    }

    #[test]
    fn a_list_or_a_routes_key() {
        let list = "- route_id: web\n  protocol: http\n  metadata: {module_type: alb}\n";
        assert_eq!(parse_routes(list, "f").unwrap().len(), 1);
        let doc = "grpc: {listen: \"0.0.0.0:1\"}\nroutes:\n  - route_id: web\n    protocol: http\n    metadata: {module_type: alb}\n";
        let routes = parse_routes(doc, "f").unwrap();
        assert_eq!(routes[0].route_id, "web");
        assert!(parse_routes("", "f").unwrap().is_empty());
        let e = parse_routes("just a string", "f.yaml").unwrap_err();
        assert!(e.to_string().starts_with("f.yaml: expected a list"), "{e}");
    }

    #[test]
    fn bad_entries_are_named_by_index() {
        let text = "- route_id: ok\n  protocol: http\n  metadata: {module_type: alb}\n\
                    - route_id: typo\n  protocl: http\n";
        let p = problems(parse_routes(text, "f").unwrap_err());
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("routes[1]: unknown field `protocl`"),
            "{p:?}"
        );
        let p = problems(parse_routes("- [1, 2\n", "f").unwrap_err());
        assert!(p[0].starts_with("not valid YAML"), "{p:?}");
    }

    #[test]
    fn local_checks_name_route_and_field_but_leave_pools_to_the_nlb() {
        let text = "- route_id: a\n  protocol: htp\n  metadata: {module_type: alb}\n\
                    - route_id: b\n  protocol: tcp\n  destination_port: 70000\n  metadata: {module_type: alb}\n\
                    - route_id: c\n  protocol: tcp\n\
                    - route_id: d\n  protocol: postgres\n  metadata: {backend: pg}\n";
        let routes = parse_routes(text, "f").unwrap();
        let p = problems(check_locally(&routes, "f").unwrap_err());
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].starts_with("routes[0].protocol: unknown protocol \"htp\""),
            "{p:?}"
        );
        assert!(p[1].starts_with("routes[1].destination_port"), "{p:?}");
        assert!(p[2].starts_with("routes[2].metadata"), "{p:?}");
    }
}
