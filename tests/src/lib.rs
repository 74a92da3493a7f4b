//! A small harness for end-to-end tests that run the real `nlb` binary, and
//! through [`nlbctl`] the real `nlbctl`; [`control`] registers instances and
//! serves a fake module, [`module`] runs the SDK's `echo-module`, [`pki`]
//! makes test certificates.
//!
//! Each test gets its own [`Sandbox`] (a temp dir holding the config file, the
//! state file and the process logs) and its own loopback ports, so tests run
//! in parallel. A started [`NlbProcess`] is killed when dropped, so a failing
//! test leaves nothing running.
//!
//! Every wait here is a bounded poll with generous slack: the machine running
//! the tests may be slow and busy, and nothing asserts on how long things took.

#![deny(unsafe_code)]

pub mod alb;
pub mod control;
pub mod l4;
pub mod l4_faults;
pub mod module;
pub mod nlbctl;
pub mod origin;
pub mod pki;
pub mod process;
pub mod rollout;

use std::fs::File;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shared_types::pb::nlb_service_client::NlbServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;

/// How long the NLB may take to become ready.
pub const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a change may take to become visible (SIGHUP reload, ...).
pub const CHANGE_DEADLINE: Duration = Duration::from_secs(30);
/// How long the NLB may take to exit after SIGTERM (its default grace is 10 s).
pub const EXIT_DEADLINE: Duration = Duration::from_secs(60);
/// Deadline for one HTTP or gRPC call.
pub const CALL_DEADLINE: Duration = Duration::from_secs(15);

const POLL: Duration = Duration::from_millis(100);

/// A binary of the workspace built next to the test executable
/// (`target/<profile>/deps/<test>` -> `target/<profile>/<name>`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(name);
    assert!(
        bin.is_file(),
        "the {name} binary is not at {}: run `cargo build --workspace` first \
         (with the same CARGO_TARGET_DIR and profile as the tests)",
        bin.display()
    );
    bin
}

/// The `nlb` binary built next to the test executable.
pub fn nlb_binary() -> PathBuf {
    binary("nlb")
}

/// A loopback port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Three distinct `127.0.0.1:<free port>` addresses: the listeners are held
/// together while picked, so the kernel cannot hand out one port twice.
pub fn free_addr3() -> (String, String, String) {
    let bind = || StdListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let (a, b, c) = (bind(), bind(), bind());
    let addr = |l: &StdListener| l.local_addr().expect("local addr").to_string();
    (addr(&a), addr(&b), addr(&c))
}

/// `127.0.0.1:<a free port>`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A `Command` for the `nlb` binary with no `NLB_*` or `RUST_LOG` variable
/// inherited from the environment running the tests.
pub fn nlb_command() -> Command {
    let mut cmd = Command::new(nlb_binary());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("NLB_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `nlb` with `args` to completion (for `--check-config` and start
/// failures), with a deadline.
pub fn run_nlb(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Output {
    let mut cmd = nlb_command();
    cmd.args(args).current_dir(cwd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let run = next_id();
    let out_path = cwd.join(format!("run-{run}.stdout"));
    let err_path = cwd.join(format!("run-{run}.stderr"));
    cmd.stdout(File::create(&out_path).expect("create stdout file"));
    cmd.stderr(File::create(&err_path).expect("create stderr file"));
    let mut child = cmd.spawn().expect("spawn nlb");
    let status = wait_exit_blocking(&mut child, EXIT_DEADLINE).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "nlb {args:?} did not exit within {EXIT_DEADLINE:?}; stderr:\n{}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        )
    });
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

fn next_id() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn wait_exit_blocking(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// A temp dir with a config file path and a state file path.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Self {
        Sandbox {
            dir: tempfile::Builder::new()
                .prefix("nlb-e2e-")
                .tempdir()
                .expect("create a temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `<dir>/nlb.yaml`.
    pub fn config_path(&self) -> PathBuf {
        self.path().join("nlb.yaml")
    }

    /// `<dir>/state/nlb.state.json`.
    pub fn state_path(&self) -> PathBuf {
        self.path().join("state").join("nlb.state.json")
    }

    /// Writes the config file atomically (a reload never sees half a file).
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.path().join(".nlb.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, self.config_path()).expect("rename config");
    }

    /// Starts `nlb --config <config_path>` on fresh ports, with the state file
    /// in the sandbox, and waits until it is ready.
    pub async fn start(&self) -> NlbProcess {
        self.start_with(Launch::default()).await
    }

    /// Starts `nlb` as `launch` says and waits until it is ready. Ports the
    /// harness picked are picked again if another process took them first.
    pub async fn start_with(&self, launch: Launch) -> NlbProcess {
        let mut last_err = String::new();
        for _ in 0..5 {
            let mut p = self.spawn(&launch);
            match p.wait_ready().await {
                Ok(()) => return p,
                Err(e) => {
                    let lost_race = launch.grpc_addr.is_none()
                        && launch.admin_addr.is_none()
                        && e.contains("cannot listen on")
                        && e.contains("in use");
                    if !lost_race {
                        panic!("{e}");
                    }
                    last_err = e;
                }
            }
        }
        panic!("could not start nlb on free ports: {last_err}");
    }

    /// Spawns `nlb` as `launch` says, without waiting.
    pub fn spawn(&self, launch: &Launch) -> NlbProcess {
        let grpc_addr = launch.grpc_addr.clone().unwrap_or_else(free_addr);
        let admin_addr = launch.admin_addr.clone().unwrap_or_else(free_addr);
        let mut cmd = nlb_command();
        cmd.current_dir(self.path());
        if launch.use_config_file {
            cmd.arg("--config").arg(self.config_path());
        }
        cmd.env("NLB_GRPC_LISTEN", &grpc_addr)
            .env("NLB_ADMIN_LISTEN", &admin_addr)
            .env("NLB_STATE_FILE", self.state_path())
            .env("NLB_LOG", "info");
        for (k, v) in &launch.env {
            cmd.env(k, v);
        }
        let run = next_id();
        let stdout_path = self.path().join(format!("nlb-{run}.stdout"));
        let stderr_path = self.path().join(format!("nlb-{run}.stderr"));
        cmd.stdout(File::create(&stdout_path).expect("create stdout file"));
        cmd.stderr(File::create(&stderr_path).expect("create stderr file"));
        let child = cmd.spawn().expect("spawn nlb");
        NlbProcess {
            process: process::Spawned::new(child, stderr_path, "nlb"),
            grpc_addr,
            admin_addr,
        }
    }
}

/// How to start `nlb`.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Pass `--config <sandbox config>`.
    pub use_config_file: bool,
    /// `NLB_GRPC_LISTEN` (default: a free loopback port).
    pub grpc_addr: Option<String>,
    /// `NLB_ADMIN_LISTEN` (default: a free loopback port).
    pub admin_addr: Option<String>,
    /// More environment variables (set after the ones above, so they win).
    pub env: Vec<(String, String)>,
}

impl Default for Launch {
    fn default() -> Self {
        Launch {
            use_config_file: true,
            grpc_addr: None,
            admin_addr: None,
            env: Vec::new(),
        }
    }
}

/// A running `nlb`; killed (SIGKILL) on drop if still running.
pub struct NlbProcess {
    process: process::Spawned,
    pub grpc_addr: String,
    pub admin_addr: String,
}

/// A response from the admin port.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

impl NlbProcess {
    /// Polls `/readyz` until it answers 200. Errs (with the logs) if the
    /// process exits first or the deadline passes.
    pub async fn wait_ready(&mut self) -> Result<(), String> {
        let until = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.try_exit() {
                return Err(format!(
                    "nlb exited with {status} before it was ready; stderr:\n{}",
                    self.stderr()
                ));
            }
            if let Ok(r) = self.try_get("/readyz").await {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= until {
                return Err(format!(
                    "nlb was not ready within {START_DEADLINE:?}; stderr:\n{}",
                    self.stderr()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A gRPC client of the control API.
    pub async fn client(&self) -> NlbServiceClient<Channel> {
        let endpoint = Channel::from_shared(format!("http://{}", self.grpc_addr))
            .expect("a valid URI")
            .connect_timeout(CALL_DEADLINE)
            .timeout(CALL_DEADLINE);
        let channel = endpoint.connect().await.unwrap_or_else(|e| {
            panic!(
                "connect to the gRPC port {}: {e}; stderr:\n{}",
                self.grpc_addr,
                self.stderr()
            )
        });
        NlbServiceClient::new(channel)
    }

    /// GET on the admin port; panics if the port does not answer.
    pub async fn get(&self, path: &str) -> HttpResponse {
        self.try_get(path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}; stderr:\n{}", self.stderr()))
    }

    /// GET on the admin port, as raw HTTP/1.1.
    pub async fn try_get(&self, path: &str) -> Result<HttpResponse, String> {
        http_get(&self.admin_addr, path).await
    }

    /// Polls until `check` returns `Some`, or panics at the deadline with
    /// `what` and the logs.
    pub async fn eventually<T, F, Fut>(&self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        poll_until(what, || self.stderr(), check).await
    }
}

/// Polls `check` until it returns `Some`, for up to [`CHANGE_DEADLINE`];
/// at the deadline, panics with `what` and `logs()` (the process's stderr).
pub async fn poll_until<T, F, Fut>(what: &str, logs: impl Fn() -> String, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + CHANGE_DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < until,
            "{what}: not seen within {CHANGE_DEADLINE:?}; stderr:\n{}",
            logs()
        );
        tokio::time::sleep(POLL).await;
    }
}

impl std::ops::Deref for NlbProcess {
    type Target = crate::process::Spawned;
    fn deref(&self) -> &Self::Target {
        &self.process
    }
}

impl std::ops::DerefMut for NlbProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.process
    }
}

/// A raw HTTP/1.1 GET (`Connection: close`) with a deadline.
pub async fn http_get(addr: &str, path: &str) -> Result<HttpResponse, String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(buf)
    };
    let raw = tokio::time::timeout(CALL_DEADLINE, exchange)
        .await
        .map_err(|_| format!("GET {path} on {addr}: no answer within {CALL_DEADLINE:?}"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line: {head:?}"))?;
    Ok(HttpResponse {
        status,
        body: body.to_string(),
    })
}

/// The value of a Prometheus sample line, e.g.
/// `metric_value(text, r#"nlb_config_reloads_total{result="failed"}"#)`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
