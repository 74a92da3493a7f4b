//! Clients of the modules' `ModuleService`, one lazily connected channel per
//! address, every call under a deadline. Calls that change a module carry
//! the NLB's module call token (the `nlb` token modules accept for their
//! changing RPCs); reads (health checks, `CanHandle`) never do, so a
//! registered address receives the token only when the NLB changes it.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use parking_lot::Mutex;
use shared_types::pb::module_service_client::ModuleServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::security::CallToken;

/// A client of one module's ModuleService.
pub type ModuleClient = ModuleServiceClient<Channel>;

/// Channels to module instances, keyed by their ModuleService address.
#[derive(Default)]
pub struct ModuleClients {
    channels: Mutex<HashMap<String, Channel>>,
    token: CallToken,
}

impl ModuleClients {
    pub fn new(token: CallToken) -> Self {
        ModuleClients {
            channels: Mutex::default(),
            token,
        }
    }

    fn wrap(&self, ch: Channel) -> ModuleClient {
        ModuleServiceClient::new(ch)
    }

    /// A request that changes a module: the grpc-timeout header and the
    /// module call token (when one is configured).
    pub fn changing<T>(&self, msg: T, deadline: Duration) -> tonic::Request<T> {
        let mut r = request(msg, deadline);
        if let Some(v) = self.token.load_full() {
            r.metadata_mut().insert("authorization", (*v).clone());
        }
        r
    }

    /// A client for the module at `address` (`host:port`).
    pub fn client(&self, address: &str) -> Result<ModuleClient, Status> {
        let mut channels = self.channels.lock();
        if let Some(ch) = channels.get(address) {
            return Ok(self.wrap(ch.clone()));
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| Status::invalid_argument(format!("module address {address:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        let ch = endpoint.connect_lazy();
        channels.insert(address.to_string(), ch.clone());
        Ok(self.wrap(ch))
    }

    /// Forgets the channel to an address (its instance left).
    pub fn forget(&self, address: &str) {
        self.channels.lock().remove(address);
    }

    /// Calls a module with a deadline; the error names the instance, its
    /// address and what failed.
    pub async fn call<T, F, Fut>(
        &self,
        instance_id: &str,
        address: &str,
        deadline: Duration,
        f: F,
    ) -> Result<T, Status>
    where
        F: FnOnce(ModuleClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let client = self.client(address)?;
        let started = tokio::time::Instant::now();
        let missed = || {
            Status::deadline_exceeded(format!(
                "module {instance_id} at {address} did not answer within {} ms",
                deadline.as_millis()
            ))
        };
        match tokio::time::timeout(deadline, f(client)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            // The module may enforce the grpc-timeout we send and give up at
            // the same moment we do: report the same miss either way.
            Ok(Err(status))
                if started.elapsed() >= deadline
                    && matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded) =>
            {
                Err(missed())
            }
            Ok(Err(status)) => Err(Status::new(
                status.code(),
                format!("module {instance_id} at {address}: {}", status.message()),
            )),
            Err(_) => Err(missed()),
        }
    }
}

/// Most module calls one fan-out keeps in flight.
pub const FAN_OUT: usize = 32;

impl ModuleClients {
    /// Calls every `(instance id, address)` concurrently (at most [`FAN_OUT`]
    /// at once), each under `deadline`; `f` makes the call from the instance
    /// id and a client. Answers come in completion order.
    pub async fn fan_out<T, F, Fut>(
        &self,
        targets: Vec<(String, String)>,
        deadline: Duration,
        f: F,
    ) -> Vec<(String, Result<T, Status>)>
    where
        F: Fn(String, ModuleClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        use futures::stream::{self, StreamExt};
        let f = &f;
        stream::iter(targets)
            .map(|(id, addr)| async move {
                let r = self.call(&id, &addr, deadline, |c| f(id.clone(), c)).await;
                (id, r)
            })
            .buffer_unordered(FAN_OUT)
            .collect()
            .await
    }
}

/// A request with the grpc-timeout header set.
pub fn request<T>(msg: T, deadline: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(deadline);
    r
}
