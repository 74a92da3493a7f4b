//! Switchyard's network load balancer as a library: the binary `nlb` wires
//! these parts together, and tests drive them directly.

#![deny(unsafe_code)]

pub mod routing;
