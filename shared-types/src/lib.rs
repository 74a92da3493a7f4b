//! The `marchproxy` wire contract as Rust types, and the conversions the rest of
//! Switchyard shares.
//!
//! `pb` is generated from `proto/marchproxy/*.proto` at build time (protox, no
//! system `protoc`). Everything else here is hand-written: names for enums as
//! users write them in YAML and on the command line, timestamps, builders
//! for the contract's `Error` message, and the contract's `Query` (filters,
//! sort, pages) as DESIGN.md decides it, for the NLB and the modules alike.
//! And [`proxy_v2`], the PROXY protocol v2 header codec (pure bytes, no I/O)
//! that the NLB and the module SDK share, and [`sniff`], the protocol
//! detectors the NLB runs on a connection's first bytes (pure bytes too, here
//! so that the fuzz targets reach them). And [`spread`], which evens out
//! connections over the data threads of both, and [`data_thread`], the timer
//! each of those threads keeps. [`id_map`] keeps their live connections
//! by id. With the `mimalloc` feature, [`allocator`] tunes the allocator
//! the NLB and the ALB run on.

#![deny(unsafe_code)]

#[cfg(feature = "mimalloc")]
pub mod allocator;
pub mod data_thread;
pub mod error;
pub mod id_map;
pub mod names;
pub mod proxy_v2;
pub mod query;
pub mod sniff;
pub mod spread;
pub mod time;

pub mod pb {
    //! Generated code for package `marchproxy`.
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("marchproxy");
}

pub use names::UnknownName;

/// The encoded `FileDescriptorSet` of the contract (for server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/marchproxy_descriptor.bin"));
