//! The wire-contract check: our compiled protos against the facts in
//! `proto/marchproxy-wire.json` (copied from the public MarchProxy protos).
//!
//! Every listed enum value, message field (name, number, type, label, map
//! key/value) and RPC (path, request, response, streaming) must be identical.
//! Additions are allowed. Each difference is reported naming the item.

use std::collections::BTreeMap;

use prost::Message;
use prost_types::{
    field_descriptor_proto::{Label, Type},
    DescriptorProto, FileDescriptorSet,
};
use serde_json::Value;

/// (path, request, response, client_streaming, server_streaming)
type RpcFacts = (String, String, String, bool, bool);

/// What our descriptors say, flattened into the facts file's vocabulary.
struct Compiled {
    enums: BTreeMap<String, BTreeMap<String, i32>>,
    /// message -> field name -> (number, type, label)
    messages: BTreeMap<String, BTreeMap<String, (i32, String, String)>>,
    /// service -> rpc -> (path, request, response, client_streaming, server_streaming)
    services: BTreeMap<String, BTreeMap<String, RpcFacts>>,
}

fn scalar_name(t: Type) -> &'static str {
    match t {
        Type::Double => "double",
        Type::Float => "float",
        Type::Int64 => "int64",
        Type::Uint64 => "uint64",
        Type::Int32 => "int32",
        Type::Fixed64 => "fixed64",
        Type::Fixed32 => "fixed32",
        Type::Bool => "bool",
        Type::String => "string",
        Type::Bytes => "bytes",
        Type::Uint32 => "uint32",
        Type::Sfixed32 => "sfixed32",
        Type::Sfixed64 => "sfixed64",
        Type::Sint32 => "sint32",
        Type::Sint64 => "sint64",
        Type::Group | Type::Message | Type::Enum => "",
    }
}

fn type_of(field: &prost_types::FieldDescriptorProto) -> String {
    match field.r#type() {
        Type::Message | Type::Enum => field.type_name().trim_start_matches('.').to_string(),
        other => scalar_name(other).to_string(),
    }
}

fn compile_ours() -> Compiled {
    let fds = FileDescriptorSet::decode(shared_types::FILE_DESCRIPTOR_SET)
        .expect("the embedded descriptor set decodes");
    let mut compiled = Compiled {
        enums: BTreeMap::new(),
        messages: BTreeMap::new(),
        services: BTreeMap::new(),
    };
    for file in fds.file.iter().filter(|f| f.package() == "marchproxy") {
        for e in &file.enum_type {
            let values = e
                .value
                .iter()
                .map(|v| (v.name().to_string(), v.number()))
                .collect();
            compiled.enums.insert(e.name().to_string(), values);
        }
        for m in &file.message_type {
            compiled.messages.insert(m.name().to_string(), fields_of(m));
        }
        for s in &file.service {
            let rpcs = s
                .method
                .iter()
                .map(|rpc| {
                    let path = format!("/marchproxy.{}/{}", s.name(), rpc.name());
                    (
                        rpc.name().to_string(),
                        (
                            path,
                            rpc.input_type().trim_start_matches('.').to_string(),
                            rpc.output_type().trim_start_matches('.').to_string(),
                            rpc.client_streaming(),
                            rpc.server_streaming(),
                        ),
                    )
                })
                .collect();
            compiled.services.insert(s.name().to_string(), rpcs);
        }
    }
    compiled
}

fn fields_of(m: &DescriptorProto) -> BTreeMap<String, (i32, String, String)> {
    let mut out = BTreeMap::new();
    for f in &m.field {
        let map_entry = m.nested_type.iter().find(|n| {
            n.options.as_ref().is_some_and(|o| o.map_entry())
                && f.type_name().ends_with(&format!(".{}", n.name()))
        });
        let (ty, label) = if let Some(entry) = map_entry.filter(|_| f.label() == Label::Repeated) {
            let key = entry.field.iter().find(|x| x.number() == 1).map(type_of);
            let value = entry.field.iter().find(|x| x.number() == 2).map(type_of);
            (
                format!(
                    "map<{},{}>",
                    key.unwrap_or_default(),
                    value.unwrap_or_default()
                ),
                "map",
            )
        } else {
            let label = match f.label() {
                Label::Repeated => "repeated",
                Label::Required => "required",
                Label::Optional if f.proto3_optional() => "proto3_optional",
                Label::Optional => "optional",
            };
            (type_of(f), label)
        };
        out.insert(f.name().to_string(), (f.number(), ty, label.to_string()));
    }
    out
}

/// Compares the facts against what we compiled; returns one line per difference.
fn differences(facts: &Value, ours: &Compiled) -> Vec<String> {
    let mut diffs = Vec::new();
    if facts["package"] != "marchproxy" {
        diffs.push(format!("package: facts say {}", facts["package"]));
    }
    for (name, values) in facts["enums"].as_object().expect("enums object") {
        let Some(our) = ours.enums.get(name) else {
            diffs.push(format!("enum {name}: missing"));
            continue;
        };
        for (value, number) in values.as_object().expect("enum values") {
            match our.get(value) {
                None => diffs.push(format!("enum {name}: value {value} missing")),
                Some(n) if Some(i64::from(*n)) != number.as_i64() => diffs.push(format!(
                    "enum {name}: value {value} is {n}, contract says {number}"
                )),
                Some(_) => {}
            }
        }
    }
    for (name, message) in facts["messages"].as_object().expect("messages object") {
        let Some(our) = ours.messages.get(name) else {
            diffs.push(format!("message {name}: missing"));
            continue;
        };
        for field in message["fields"].as_array().expect("fields array") {
            let fname = field["name"].as_str().expect("field name");
            let want = (
                field["number"].as_i64().expect("field number"),
                field["type"].as_str().expect("field type"),
                field["label"].as_str().expect("field label"),
            );
            let Some((number, ty, label)) = our.get(fname) else {
                diffs.push(format!("message {name}: field {fname} missing"));
                continue;
            };
            if i64::from(*number) != want.0 {
                diffs.push(format!(
                    "message {name}: field {fname} has number {number}, contract says {}",
                    want.0
                ));
            }
            if ty != want.1 {
                diffs.push(format!(
                    "message {name}: field {fname} has type {ty}, contract says {}",
                    want.1
                ));
            }
            if label != want.2 {
                diffs.push(format!(
                    "message {name}: field {fname} has label {label}, contract says {}",
                    want.2
                ));
            }
        }
        // A number the contract gives one field must not be reused by an addition.
        let contract_numbers: Vec<i64> = message["fields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["number"].as_i64())
            .collect();
        for (fname, (number, _, _)) in our {
            let listed = message["fields"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|f| f["name"] == fname.as_str());
            if !listed && contract_numbers.contains(&i64::from(*number)) {
                diffs.push(format!(
                    "message {name}: added field {fname} reuses contract number {number}"
                ));
            }
        }
    }
    for (service, rpcs) in facts["services"].as_object().expect("services object") {
        let Some(our) = ours.services.get(service) else {
            diffs.push(format!("service {service}: missing"));
            continue;
        };
        for rpc in rpcs.as_array().expect("rpc array") {
            let rname = rpc["rpc"].as_str().expect("rpc name");
            let Some((path, req, resp, cs, ss)) = our.get(rname) else {
                diffs.push(format!("service {service}: rpc {rname} missing"));
                continue;
            };
            let checks = [
                (
                    "path",
                    path.as_str(),
                    rpc["path"].as_str().unwrap_or_default(),
                ),
                ("request", req, rpc["request"].as_str().unwrap_or_default()),
                (
                    "response",
                    resp,
                    rpc["response"].as_str().unwrap_or_default(),
                ),
            ];
            for (what, got, want) in checks {
                if got != want {
                    diffs.push(format!(
                        "service {service}: rpc {rname} {what} is {got}, contract says {want}"
                    ));
                }
            }
            if Some(*cs) != rpc["client_streaming"].as_bool() {
                diffs.push(format!(
                    "service {service}: rpc {rname} client streaming differs"
                ));
            }
            if Some(*ss) != rpc["server_streaming"].as_bool() {
                diffs.push(format!(
                    "service {service}: rpc {rname} server streaming differs"
                ));
            }
        }
    }
    diffs
}

fn facts() -> Value {
    let text = include_str!("../../proto/marchproxy-wire.json");
    serde_json::from_str(text).expect("proto/marchproxy-wire.json is valid JSON")
}

#[test]
fn compiled_protos_match_the_marchproxy_contract() {
    let facts = facts();
    let ours = compile_ours();
    let diffs = differences(&facts, &ours);
    assert!(
        diffs.is_empty(),
        "our protos differ from the marchproxy contract:\n  {}",
        diffs.join("\n  ")
    );
    // The facts are not vacuous: they list what the contract README counts.
    assert_eq!(facts["enums"].as_object().map(|e| e.len()), Some(4));
    assert_eq!(facts["messages"].as_object().map(|m| m.len()), Some(103));
    assert_eq!(
        facts["services"]["NLBService"].as_array().map(Vec::len),
        Some(20)
    );
    assert_eq!(
        facts["services"]["ModuleService"].as_array().map(Vec::len),
        Some(22)
    );
}

#[test]
fn the_check_names_each_difference() {
    let ours = compile_ours();
    let mut facts = facts();
    facts["enums"]["Protocol"]["PROTOCOL_GRPC"] = 70.into();
    facts["messages"]["Route"]["fields"][5]["number"] = 60.into();
    facts["messages"]["ModuleInstance"]["fields"][4]["type"] = "map<string,int32>".into();
    facts["messages"]["Query"]["fields"][0]["label"] = "optional".into();
    facts["services"]["NLBService"][12]["server_streaming"] = false.into();
    facts["services"]["ModuleService"][3]["response"] = "marchproxy.Empty".into();
    facts["messages"]["Error"]["fields"]
        .as_array_mut()
        .unwrap()
        .push(
            serde_json::json!({"number": 9, "name": "hint", "type": "string", "label": "optional"}),
        );

    let diffs = differences(&facts, &ours);
    let expect = [
        "enum Protocol: value PROTOCOL_GRPC is 7, contract says 70",
        "message Route: field destination_port has number 6, contract says 60",
        "message ModuleInstance: field metadata has type map<string,string>, contract says map<string,int32>",
        "message Query: field filters has label repeated, contract says optional",
        "service NLBService: rpc StreamNLBMetrics server streaming differs",
        "service ModuleService: rpc CanHandle response is marchproxy.CanHandleResponse, contract says marchproxy.Empty",
        "message Error: field hint missing",
    ];
    for e in expect {
        assert!(diffs.iter().any(|d| d == e), "expected {e:?} in {diffs:#?}");
    }
    assert_eq!(diffs.len(), expect.len(), "{diffs:#?}");
}
