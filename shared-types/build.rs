//! Compiles `proto/marchproxy/*.proto` with protox (pure Rust), so a fresh clone
//! builds with no system `protoc`. The descriptor set is also written to OUT_DIR
//! for server reflection and the wire-contract test.

use std::{env, fs, path::PathBuf};

use prost::Message;

const FILES: &[&str] = &[
    "marchproxy/types.proto",
    "marchproxy/rollout.proto",
    "marchproxy/nlb.proto",
    "marchproxy/module.proto",
];

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest.join("../proto");
    for file in FILES {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }

    let fds = protox::compile(FILES, [&proto_root])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("marchproxy_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
