//! A process the harness started: its pid, its logs (stderr, to a file),
//! signals, a bounded wait for its exit, and a kill when dropped (a failing
//! test leaves nothing running). `NlbProcess`, `ModuleProcess` and
//! `AlbProcess` each wrap one and reach these through `Deref`.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::EXIT_DEADLINE;

const POLL: Duration = Duration::from_millis(100);

pub struct Spawned {
    child: Child,
    stderr_path: PathBuf,
    exited: Option<ExitStatus>,
    /// What it is, in messages (`nlb`, `echo-module`, `alb`).
    name: &'static str,
}

impl Spawned {
    pub fn new(child: Child, stderr_path: PathBuf, name: &'static str) -> Self {
        Spawned {
            child,
            stderr_path,
            exited: None,
            name,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to stderr so far (its logs).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The exit status, if the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// Sends a signal (`"HUP"`, `"TERM"`, ...) with `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// Waits (bounded by [`EXIT_DEADLINE`]) for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let until = Instant::now() + EXIT_DEADLINE;
        loop {
            if let Some(s) = self.try_exit() {
                return s;
            }
            assert!(
                Instant::now() < until,
                "{} did not exit within {EXIT_DEADLINE:?}; stderr:\n{}",
                self.name,
                self.stderr()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
