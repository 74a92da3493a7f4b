//! `alb`: Switchyard's HTTP/1.1 and HTTP/2 reverse proxy, a module on the
//! module SDK behind the NLB.
//!
//! - [`proxy`]: the data path (TLS by SNI or plaintext on one port, HTTP/1.1
//!   and HTTP/2, routing, limits, forwarding, retries, WebSocket upgrades).
//! - [`routes`]: the route table (host, path, headers, priority).
//! - [`cluster`]: upstream clusters (balancing, health checks, outlier
//!   ejection, retry budget); [`upstream`]: their pooled clients.
//! - [`tls`]: certificates by SNI, reloaded; TLS to upstreams.
//! - [`headers`]: hop-by-hop removal, forwarding headers, request ids.
//! - [`alb`]: the state and the SDK's `Module` over it.

#![deny(unsafe_code)]

pub mod alb;
pub mod cluster;
pub mod config;
pub mod conn_timer;
pub mod deadline;
pub mod h1;
pub mod headers;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod routes;
pub mod tls;
pub mod upstream;
