//! The routing core: one code path for `RouteRequest` and the L4 data plane.
//!
//! Routes come from module announcements, operator routes and static backend
//! pools. [`Snapshot`] compiles them with the endpoints serving each, in
//! precedence order; [`Router`] publishes snapshots behind one atomic swap, so
//! a reader takes one pointer load and never waits on the control plane.

pub mod balance;
pub mod endpoint;
pub mod pattern;
pub mod route;
pub mod table;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use endpoint::{mono_ms, ConnectionGuard, Endpoint, EndpointCounters, EndpointState};
pub use pattern::{normalize_name, Cidr, NamePattern};
pub use route::{FieldError, KeyInterner, RouteSpec, Target};
/// The protocol family found on a connection; it lives with the detectors in
/// `shared_types::sniff`.
pub use shared_types::sniff::Detected;
pub use table::{
    CompiledRoute, Policy, RouteError, RouteStatsCache, Selection, Snapshot, SnapshotInput,
};

/// What the NLB knows of a connection when routing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo<'a> {
    /// The listener port the connection arrived on.
    pub port: u16,
    pub protocol: Detected,
    /// The client address (PROXY v2 source where present, else the peer).
    pub client: Option<IpAddr>,
    /// TLS SNI or HTTP/1 Host, normalized with [`normalize_name`].
    pub server_name: Option<std::borrow::Cow<'a, str>>,
}

impl fmt::Display for ConnInfo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} to {}:{}",
            self.protocol,
            self.server_name.as_deref().unwrap_or("(no name)"),
            self.port
        )?;
        if let Some(c) = self.client {
            write!(f, " from {c}")?;
        }
        Ok(())
    }
}

/// Publishes routing snapshots. Readers call [`Router::load`] once per
/// connection and keep the `Arc` for as long as they need it.
#[derive(Debug, Default)]
pub struct Router {
    current: ArcSwap<Snapshot>,
}

impl Router {
    pub fn new(initial: Snapshot) -> Self {
        Router {
            current: ArcSwap::from_pointee(initial),
        }
    }

    /// The current snapshot (one atomic pointer load).
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Publishes a new snapshot; connections routed on the old one keep it.
    pub fn publish(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
    }
}
