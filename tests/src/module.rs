//! Running a real module binary (the SDK's `echo-module`) next to a real
//! NLB: spawn it on free loopback ports, read its admin port, call its
//! ModuleService, talk to its data port.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shared_types::pb::module_service_client::ModuleServiceClient;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tonic::transport::Channel;

use crate::{binary, http_get, HttpResponse, CALL_DEADLINE};

const POLL: Duration = Duration::from_millis(100);

/// How to start a module.
#[derive(Debug, Clone, Default)]
pub struct ModuleLaunch {
    /// `MODULE_INSTANCE_ID` (default: the SDK's own).
    pub instance_id: Option<String>,
    /// A config file body (YAML), written to the sandbox and passed with
    /// `--config`.
    pub config: Option<String>,
    /// More environment variables.
    pub env: Vec<(String, String)>,
}

/// A running module process; killed on drop if still running.
pub struct ModuleProcess {
    process: crate::process::Spawned,
    pub grpc_addr: String,
    pub data_addr: String,
    pub admin_addr: String,
    pub config_path: Option<PathBuf>,
}

/// Starts `echo-module` against the NLB at `nlb_addr`, without waiting.
pub fn spawn_echo(dir: &Path, nlb_addr: &str, launch: &ModuleLaunch) -> ModuleProcess {
    let (grpc_addr, data_addr, admin_addr) = crate::free_addr3();
    let mut cmd = Command::new(binary("echo-module"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("MODULE_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let config_path = launch.config.as_ref().map(|body| {
        let p = dir.join(format!("module-{n}.yaml"));
        std::fs::write(&p, body).expect("write the module config");
        p
    });
    if let Some(p) = &config_path {
        cmd.arg("--config").arg(p);
    }
    cmd.env("MODULE_NLB_ADDR", nlb_addr)
        .env("MODULE_GRPC_LISTEN", &grpc_addr)
        .env("MODULE_DATA_LISTEN", &data_addr)
        .env("MODULE_ADMIN_LISTEN", &admin_addr)
        .env("MODULE_LOG", "info,switchyard_sdk=debug")
        .stdin(Stdio::null());
    if let Some(id) = &launch.instance_id {
        cmd.env("MODULE_INSTANCE_ID", id);
    }
    for (k, v) in &launch.env {
        cmd.env(k, v);
    }
    let stderr_path = dir.join(format!("module-{n}.stderr"));
    cmd.stdout(File::create(dir.join(format!("module-{n}.stdout"))).expect("stdout file"));
    cmd.stderr(File::create(&stderr_path).expect("stderr file"));
    let child = cmd.spawn().expect("spawn echo-module");
    ModuleProcess {
        process: crate::process::Spawned::new(child, stderr_path, "echo-module"),
        grpc_addr,
        data_addr,
        admin_addr,
        config_path,
    }
}

impl ModuleProcess {
    pub async fn get(&self, path: &str) -> HttpResponse {
        http_get(&self.admin_addr, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path} on the module: {e}; stderr:\n{}", self.stderr()))
    }

    /// GET on the admin port; `None` while it does not answer (starting).
    pub async fn try_get(&self, path: &str) -> Option<HttpResponse> {
        http_get(&self.admin_addr, path).await.ok()
    }

    /// `/status` as JSON.
    pub async fn status(&self) -> serde_json::Value {
        let r = self.get("/status").await;
        serde_json::from_str(&r.body).expect("/status is JSON")
    }

    /// Polls until `check` returns `Some`; panics at the deadline.
    pub async fn eventually<T, F, Fut>(&self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        crate::poll_until(what, || self.stderr(), check).await
    }

    /// Waits until `/readyz` answers 200 (registered and serving).
    pub async fn wait_registered(&self) {
        wait_registered("echo-module", &self.admin_addr, || self.stderr()).await;
    }

    /// A ModuleService client.
    pub async fn client(&self) -> ModuleServiceClient<Channel> {
        module_client("echo-module", &self.grpc_addr, || self.stderr()).await
    }

    /// Opens a data connection and reads the greeting line.
    pub async fn connect(&self) -> EchoConn {
        let s = TcpStream::connect(&self.data_addr)
            .await
            .unwrap_or_else(|e| panic!("connect to the data port: {e}"));
        let (r, w) = s.into_split();
        let mut c = EchoConn {
            lines: BufReader::new(r),
            w,
            greeting: String::new(),
        };
        c.greeting = c.line().await.expect("a greeting line");
        c
    }
}

/// Waits until the module (any module on the SDK) with this admin port
/// answers `/readyz` 200: registered with the NLB and serving.
pub async fn wait_registered(what: &str, admin_addr: &str, logs: impl Fn() -> String) {
    crate::poll_until(
        &format!("{what} registered (/readyz 200)"),
        logs,
        || async {
            http_get(admin_addr, "/readyz")
                .await
                .ok()
                .filter(|r| r.status == 200)
        },
    )
    .await;
}

/// A client of the ModuleService of a module on the SDK.
pub async fn module_client(
    what: &str,
    grpc_addr: &str,
    logs: impl Fn() -> String,
) -> ModuleServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{grpc_addr}"))
        .expect("a valid URI")
        .connect_timeout(CALL_DEADLINE)
        .timeout(CALL_DEADLINE)
        .connect()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connect to {what}'s ModuleService: {e}; stderr:\n{}",
                logs()
            )
        });
    ModuleServiceClient::new(channel)
}

impl std::ops::Deref for ModuleProcess {
    type Target = crate::process::Spawned;
    fn deref(&self) -> &Self::Target {
        &self.process
    }
}

impl std::ops::DerefMut for ModuleProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.process
    }
}

/// A line-oriented connection to `echo-module`.
pub struct EchoConn {
    lines: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    /// The first line the module sent.
    pub greeting: String,
}

impl EchoConn {
    /// The next line (without the newline); `None` at end of stream.
    pub async fn line(&mut self) -> Option<String> {
        let mut s = String::new();
        let n = tokio::time::timeout(CALL_DEADLINE, self.lines.read_line(&mut s))
            .await
            .expect("a line within the call deadline")
            .ok()?;
        (n > 0).then(|| s.trim_end_matches('\n').to_string())
    }

    /// Sends a line and returns the answer.
    pub async fn ask(&mut self, text: &str) -> Option<String> {
        self.w
            .write_all(format!("{text}\n").as_bytes())
            .await
            .ok()?;
        self.line().await
    }
}

/// Starts `echo-module` as [`spawn_echo`] does and waits until it listens;
/// when another process took one of its ports first (a free port is only
/// free for a moment), starts it again on new ones.
pub async fn start_echo(dir: &Path, nlb_addr: &str, launch: &ModuleLaunch) -> ModuleProcess {
    let mut last = String::new();
    for _ in 0..5 {
        let mut m = spawn_echo(dir, nlb_addr, launch);
        match m.wait_listening().await {
            Ok(()) => return m,
            Err(e) if e.contains("cannot listen on") && e.contains("in use") => last = e,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("could not start echo-module on free ports: {last}");
}

impl ModuleProcess {
    /// Waits until the module's admin port answers `/status` with this
    /// process's addresses (so all three ports are bound); errs with the
    /// logs if the process exits first.
    pub async fn wait_listening(&mut self) -> Result<(), String> {
        let until = Instant::now() + crate::START_DEADLINE;
        loop {
            if let Some(status) = self.try_exit() {
                return Err(format!(
                    "echo-module exited with {status} before it listened; stderr:\n{}",
                    self.stderr()
                ));
            }
            if let Some(r) = self.try_get("/status").await {
                let ours = serde_json::from_str::<serde_json::Value>(&r.body).is_ok_and(|v| {
                    v["grpc_address"] == *self.grpc_addr && v["data_address"] == *self.data_addr
                });
                if ours {
                    return Ok(());
                }
            }
            if Instant::now() >= until {
                return Err(format!(
                    "echo-module did not listen within {:?}; stderr:\n{}",
                    crate::START_DEADLINE,
                    self.stderr()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// `msg` as a request carrying the metadata header `name: value` (for
/// tokens: `authorization` with `Bearer <token>`, or `x-api-key`).
pub fn with_header<T>(msg: T, name: &'static str, value: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        name,
        value.parse().expect("a header value a request can carry"),
    );
    r
}

/// `msg` with `authorization: Bearer <token>`.
pub fn bearer<T>(msg: T, token: &str) -> tonic::Request<T> {
    with_header(msg, "authorization", &format!("Bearer {token}"))
}

/// The lowercase hex SHA-256 of `data` (the checksum `GetConfig` sends).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
