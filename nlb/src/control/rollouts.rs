//! The rollout RPCs (a Switchyard extension of `NLBService`): thin
//! wrappers over [`crate::rollout::Rollouts`].

use shared_types::pb::{self, ModuleType};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::ControlService;
use crate::rollout::RolloutError;

/// A rollout's events end with one of these.
fn is_final(kind: i32) -> bool {
    matches!(
        pb::RolloutEventKind::try_from(kind),
        Ok(pb::RolloutEventKind::Succeeded | pb::RolloutEventKind::RolledBack)
    )
}

impl ControlService {
    /// The versions the type's registered instances run (sorted, once each).
    fn versions_of(&self, t: ModuleType) -> Vec<String> {
        let mut versions: Vec<String> = self
            .nlb
            .registry
            .list()
            .into_iter()
            .filter(|v| v.module_type == t)
            .map(|v| v.instance.version)
            .collect();
        versions.sort();
        versions.dedup();
        versions
    }

    pub(super) fn start_rollout(
        &self,
        req: pb::StartRolloutRequest,
    ) -> Result<pb::StartRolloutResponse, Status> {
        let t = ModuleType::from_wire(req.module_type).unwrap_or(ModuleType::Unspecified);
        let rollout = self.nlb.rollouts.start(&req, &self.versions_of(t))?;
        Ok(pb::StartRolloutResponse {
            rollout: Some(rollout),
        })
    }

    pub(super) fn get_rollout(
        &self,
        req: pb::GetRolloutRequest,
    ) -> Result<pb::GetRolloutResponse, Status> {
        Ok(pb::GetRolloutResponse {
            rollout: Some(self.nlb.rollouts.get(req.rollout_id.trim())?),
        })
    }

    pub(super) fn list_rollouts(
        &self,
        req: pb::ListRolloutsRequest,
    ) -> Result<pb::ListRolloutsResponse, Status> {
        let t = ModuleType::from_wire(req.module_type).ok_or_else(|| {
            Status::invalid_argument(format!(
                "module_type: {} is not a module type",
                req.module_type
            ))
        })?;
        Ok(pb::ListRolloutsResponse {
            rollouts: self.nlb.rollouts.list(t, req.active_only),
        })
    }

    pub(super) fn watch_rollout(
        &self,
        req: pb::WatchRolloutRequest,
    ) -> Result<tonic::codegen::BoxStream<pb::RolloutEvent>, Status> {
        let id = req.rollout_id.trim().to_string();
        let (kept, ended, mut live) = self
            .nlb
            .rollouts
            .watch(&id, req.after_sequence)
            .map_err(Status::from)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut stopping = self.nlb.shutdown_signal.subscribe();
        tokio::spawn(async move {
            let mut last = req.after_sequence;
            for e in kept {
                last = e.sequence;
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            if ended {
                return;
            }
            loop {
                let e = tokio::select! {
                    e = live.recv() => Some(e),
                    () = tx.closed() => return,
                    _ = stopping.wait_for(|s| *s) => None,
                };
                let Some(e) = e else {
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "the NLB is shutting down; watch again with after_sequence {last} to go on"
                        ))))
                        .await;
                    return;
                };
                match e {
                    Ok(e) if e.rollout_id == id && e.sequence > last => {
                        last = e.sequence;
                        let end = is_final(e.kind);
                        if tx.send(Ok(e)).await.is_err() || end {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "this watcher fell {n} events behind; watch again with after_sequence {last}"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

impl From<RolloutError> for Status {
    fn from(e: RolloutError) -> Self {
        crate::rollout::status_of(e)
    }
}
