//! One function per command: build the request, make the call, print the
//! answer as a table or JSON, and say which exit code it deserves.

mod config;
mod load;
mod metrics;
mod modules;
mod rollout;
mod routes;
mod status;

use shared_types::pb;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::cli::{Command, ConfigCmd, ModulesCmd, QueryArgs, RolloutCmd, RoutesCmd};
use super::client::Ctl;
use super::exit::{CtlError, Exit};
use super::output::Out;

/// Runs one command.
pub async fn dispatch(command: &Command, ctl: &Ctl, out: &mut Out) -> Result<Exit, CtlError> {
    match command {
        Command::Modules(ModulesCmd::List(a)) => modules::list(ctl, out, a).await,
        Command::Modules(ModulesCmd::Show { id }) => modules::show(ctl, out, id).await,
        Command::Routes(RoutesCmd::Show(a)) => routes::show(ctl, out, a).await,
        Command::Routes(RoutesCmd::Apply(a)) => routes::apply(ctl, out, a).await,
        Command::Routes(RoutesCmd::DryRun(a)) => routes::dry_run(ctl, out, a).await,
        Command::Status(a) => status::status(ctl, out, a).await,
        Command::Health(a) => status::health(ctl, out, a).await,
        Command::Metrics(a) => metrics::metrics(ctl, out, a).await,
        Command::Load(a) => load::load(ctl, out, a).await,
        Command::Rebalance(a) => load::rebalance(ctl, out, a).await,
        Command::Scale(a) => load::scale(ctl, out, a).await,
        Command::Config(ConfigCmd::Show { section }) => {
            config::show(ctl, out, section.as_deref()).await
        }
        Command::Config(ConfigCmd::Validate { section, file }) => {
            config::update(ctl, out, section, file, true).await
        }
        Command::Config(ConfigCmd::Apply { section, file }) => {
            config::update(ctl, out, section, file, false).await
        }
        Command::Rollout(RolloutCmd::Start(a)) => rollout::start(ctl, out, a).await,
        Command::Rollout(RolloutCmd::Status { id }) => rollout::status(ctl, out, id).await,
        Command::Rollout(RolloutCmd::List(a)) => rollout::list(ctl, out, a).await,
        Command::Rollout(RolloutCmd::Promote { id, full }) => {
            rollout::promote(ctl, out, id, *full).await
        }
        Command::Rollout(RolloutCmd::Pause { id, reason }) => {
            rollout::pause(ctl, out, id, reason.as_deref()).await
        }
        Command::Rollout(RolloutCmd::Resume { id }) => rollout::resume(ctl, out, id).await,
        Command::Rollout(RolloutCmd::Rollback { id, reason }) => {
            rollout::rollback(ctl, out, id, reason.as_deref()).await
        }
        Command::Rollout(RolloutCmd::Watch { id, after }) => {
            rollout::watch(ctl, out, id, *after).await
        }
    }
}

/// Ctrl-C (SIGINT) and SIGTERM, which end a watch cleanly (exit 0).
pub(super) struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    /// Installs the handlers: from here on a Ctrl-C ends the watch, not the process.
    pub(super) fn install() -> Result<Self, CtlError> {
        let handler = |kind, name| {
            signal(kind).map_err(|e| CtlError::Other(format!("cannot handle {name}: {e}")))
        };
        Ok(StopSignals {
            interrupt: handler(SignalKind::interrupt(), "SIGINT")?,
            terminate: handler(SignalKind::terminate(), "SIGTERM")?,
        })
    }

    /// Resolves when either signal arrives.
    pub(super) async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// The contract's `Query` from the listing flags (`None` when none is given).
fn query(q: &QueryArgs) -> Option<pb::Query> {
    let paged = q.page.is_some() || q.page_size.is_some();
    if q.filters.is_empty() && q.sort.is_none() && !paged {
        return None;
    }
    Some(pb::Query {
        filters: q.filters.clone(),
        sort_by: q.sort.clone().unwrap_or_default(),
        sort_desc: q.desc,
        pagination: paged.then(|| pb::Pagination {
            page: q.page.unwrap_or(1),
            page_size: q.page_size.unwrap_or(0),
            ..Default::default()
        }),
    })
}

/// A hint on stderr when a listing has more pages than the one shown.
fn more_pages_hint(what: &str, p: Option<&pb::Pagination>) {
    if let Some(p) = p {
        if p.total_pages > p.page {
            eprintln!(
                "nlbctl: page {} of {} ({} {what} in all); --page {} for the next",
                p.page,
                p.total_pages,
                p.total_items,
                p.page + 1
            );
        }
    }
}
