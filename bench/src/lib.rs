//! Load generators for `scripts/bench.sh`: they drive a running `nlb` over
//! its gRPC control API on loopback, or (`conns`) hold many TCP connections
//! through any proxy, and print what they measured. Every load loop is
//! bounded in time and in count. Nothing here asserts on timing.

pub mod client;
pub mod conns;
pub mod control;
pub mod fleet;
pub mod load;
pub mod proc_stat;
pub mod report;
pub mod scenario;
