//! Switchyard's network load balancer as a library: the binary `nlb` wires
//! these parts together, and tests drive them directly.

#![deny(unsafe_code)]

pub mod app;
pub mod config;
pub mod control;
pub mod metrics;
pub mod registry;
pub mod routing;
