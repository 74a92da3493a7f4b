//! Switchyard's network load balancer as a library: the binary `nlb` wires
//! these parts together, and tests drive them directly.
//!
//! - [`config`]: the one validated config model (YAML file, API layer in the
//!   state file, environment).
//! - [`registry`]: module instances, leases, drains and instructions.
//! - [`routing`]: the routing core shared by `RouteRequest` and the data plane.
//! - [`control`]: the `NLBService` control API and the `ModuleService` clients.
//! - [`dataplane`]: the L4 data plane: listeners, sniffing, forwarding.
//! - [`metrics`]: Prometheus metrics and the `ReportMetrics` series store.
//! - [`auth`], [`tls`], [`security`], [`audit`]: who may call what, TLS on
//!   the NLB's ports, their reloading, and the audit trail of operator changes.
//! - [`server`], [`admin`], [`liveness`]: serving, the admin port, background loops.
//! - [`ctl`]: `nlbctl`, the operator CLI over the control API.

#![deny(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod app;
pub mod audit;
pub mod auth;
pub mod config;
pub mod control;
pub mod ctl;
pub mod dataplane;
pub mod liveness;
pub mod metrics;
pub mod registry;
pub mod request_id;
pub mod rollout;
pub mod routing;
pub mod scaling;
pub mod security;
pub mod server;
pub mod tls;

pub use app::Nlb;
pub use server::{start, Running, StartError};
