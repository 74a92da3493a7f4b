//! Running the real `nlbctl` binary: to completion ([`nlbctl`]) or in the
//! background for `--watch` ([`spawn_nlbctl`]), and reading its output. Every
//! run is bounded in time and inherits no `NLBCTL_*` variable from the
//! environment running the tests.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::{binary, EXIT_DEADLINE};

/// The `nlbctl` binary built next to the test executable.
pub fn nlbctl_binary() -> std::path::PathBuf {
    binary("nlbctl")
}

/// What a finished `nlbctl` run left.
#[derive(Debug, Clone)]
pub struct CtlRun {
    /// The exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CtlRun {
    /// `--json` output as a JSON value; panics with the output if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON document ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts the exit code, showing both outputs when it differs.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "exit code; stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A `Command` for `nlbctl` with `args` and `env`, and no inherited
/// `NLBCTL_*` variable.
pub fn nlbctl_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(nlbctl_binary());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("NLBCTL_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `nlbctl` to completion (killed if it runs past [`EXIT_DEADLINE`]).
pub async fn nlbctl(args: &[&str], env: &[(&str, &str)]) -> CtlRun {
    let mut cmd = nlbctl_command(args, env);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn nlbctl");
    let out = tokio::time::timeout(EXIT_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("nlbctl {args:?} did not exit within {EXIT_DEADLINE:?}"))
        .expect("wait for nlbctl");
    CtlRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `nlbctl --addr ADDR args...`.
pub async fn nlbctl_at(addr: &str, args: &[&str]) -> CtlRun {
    let mut all = vec!["--addr", addr];
    all.extend_from_slice(args);
    nlbctl(&all, &[]).await
}

/// `nlbctl --addr ADDR` with the arguments of `line` split on whitespace
/// (readable tests; an argument with spaces needs [`nlbctl`]).
pub async fn ctl(addr: &str, line: &str) -> CtlRun {
    let args: Vec<&str> = line.split_whitespace().collect();
    nlbctl_at(addr, &args).await
}

/// [`ctl`] with `--json` added, expecting exit `code`: the JSON document.
pub async fn ctl_json(addr: &str, line: &str, code: i32) -> Value {
    let run = ctl(addr, &format!("{line} --json")).await;
    run.expect_code(code);
    run.json()
}

/// A background `nlbctl` (for `--watch`) whose stdout is read line by line;
/// killed on drop if still running.
pub struct CtlProcess {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

/// Starts `nlbctl` in the background, stdout piped, stderr inherited.
pub fn spawn_nlbctl(args: &[&str], env: &[(&str, &str)]) -> CtlProcess {
    let mut cmd = nlbctl_command(args, env);
    cmd.stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn nlbctl");
    let stdout = child.stdout.take().expect("piped stdout");
    CtlProcess {
        child,
        lines: BufReader::new(stdout).lines(),
    }
}

/// [`spawn_nlbctl`] with `--addr ADDR` and the arguments of `line` split on
/// whitespace.
pub fn spawn_ctl(addr: &str, line: &str) -> CtlProcess {
    let mut args = vec!["--addr", addr];
    args.extend(line.split_whitespace());
    spawn_nlbctl(&args, &[])
}

impl CtlProcess {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("nlbctl is running")
    }

    /// The next line of stdout within `deadline`; `None` at the end of output.
    pub async fn next_line(&mut self, deadline: Duration) -> Option<String> {
        tokio::time::timeout(deadline, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("nlbctl printed no line within {deadline:?}"))
            .expect("read nlbctl's stdout")
    }

    /// Sends a signal (`"INT"`, `"TERM"`) with `kill`.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// Waits (bounded) for the exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        tokio::time::timeout(EXIT_DEADLINE, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("nlbctl did not exit within {EXIT_DEADLINE:?}"))
            .expect("wait for nlbctl")
    }
}

/// The `key` string of each object of a JSON list (`ids(&j["modules"], "instance_id")`).
pub fn ids(list: &Value, key: &str) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|v| v[key].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The keys of a JSON object (sorted, as nlbctl prints them).
pub fn keys(obj: &Value) -> Vec<String> {
    obj.as_object()
        .unwrap_or_else(|| panic!("not an object: {obj}"))
        .keys()
        .cloned()
        .collect()
}

/// The first column of a table's rows (the first line, the header, left out).
pub fn first_column(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// The value of the first `key: value` line.
pub fn value_of(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key:?} line in:\n{text}"))
        .trim()
        .to_string()
}
