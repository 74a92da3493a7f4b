//! Running the real `alb` binary next to a real NLB, and the real clients
//! and origins its tests use: `curl` (HTTP/1.1, HTTP/2 prior knowledge,
//! HTTPS with SNI and ALPN) and `nginx` (a static origin).
//!
//! [`start_alb`] writes an SDK config file with the ALB's `module:` section
//! (given as JSON, written as YAML) and starts `alb --config FILE` on free
//! loopback ports, again on new ones when another process took one first.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shared_types::pb::module_service_client::ModuleServiceClient;
use tonic::transport::Channel;

use crate::{binary, free_port, http_get, metric_value, HttpResponse};

const POLL: Duration = Duration::from_millis(100);
/// Deadline for one `curl` run (its own `--max-time` is shorter).
pub const CURL_DEADLINE: Duration = Duration::from_secs(90);
/// `curl --max-time`, in seconds.
const CURL_MAX_TIME: &str = "60";

fn next_id() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// How to start `alb`.
#[derive(Debug, Clone)]
pub struct AlbLaunch {
    /// `instance_id`.
    pub instance_id: String,
    /// The ALB's own section (`module:`): routes, clusters, limits, tls.
    pub module: serde_json::Value,
    /// More environment variables.
    pub env: Vec<(String, String)>,
}

impl AlbLaunch {
    pub fn new(instance_id: &str, module: serde_json::Value) -> Self {
        AlbLaunch {
            instance_id: instance_id.to_string(),
            module,
            env: Vec::new(),
        }
    }
}

/// A running `alb`; killed on drop if still running.
pub struct AlbProcess {
    process: crate::process::Spawned,
    pub instance_id: String,
    pub grpc_addr: String,
    pub data_addr: String,
    pub admin_addr: String,
    pub config_path: PathBuf,
}

/// Starts `alb --config FILE` against the NLB at `nlb_addr`, without waiting.
pub fn spawn_alb(dir: &Path, nlb_addr: &str, launch: &AlbLaunch) -> AlbProcess {
    spawn_alb_with_sdk(dir, nlb_addr, launch, &serde_json::json!({}))
}

/// Starts `alb` as [`spawn_alb`] does, waits until its ports listen and it
/// registered with the NLB (`/readyz` 200); when another process took one
/// of its ports first, starts it again on new ones.
pub async fn start_alb(dir: &Path, nlb_addr: &str, launch: &AlbLaunch) -> AlbProcess {
    start_alb_with_sdk(dir, nlb_addr, launch, &serde_json::json!({})).await
}

impl AlbProcess {
    /// `http://<data port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.data_addr)
    }

    /// The data port's number (for `curl --resolve`).
    pub fn data_port(&self) -> u16 {
        self.data_addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("the data address has a port")
    }

    /// GET on the admin port; panics if it does not answer.
    pub async fn admin_get(&self, path: &str) -> HttpResponse {
        http_get(&self.admin_addr, path).await.unwrap_or_else(|e| {
            panic!(
                "GET {path} on the ALB admin port: {e}; stderr:\n{}",
                self.stderr()
            )
        })
    }

    /// The admin port's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.body
    }

    /// One sample of `/metrics` (`alb_retries_total{cluster="web"}`); 0
    /// when the series is not there yet.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series).unwrap_or(0.0)
    }

    /// Polls until `check` returns `Some`; panics at the deadline with the logs.
    pub async fn eventually<T, F, Fut>(&self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        crate::poll_until(what, || self.stderr(), check).await
    }

    /// Waits until the admin port answers `/status` with this process's
    /// addresses (so all three ports are bound); errs with the logs if the
    /// process exits first.
    pub async fn wait_listening(&mut self) -> Result<(), String> {
        let until = Instant::now() + crate::START_DEADLINE;
        loop {
            if let Some(status) = self.try_exit() {
                return Err(format!(
                    "alb exited with {status} before it listened; stderr:\n{}",
                    self.stderr()
                ));
            }
            if let Ok(r) = http_get(&self.admin_addr, "/status").await {
                let ours = serde_json::from_str::<serde_json::Value>(&r.body).is_ok_and(|v| {
                    v["grpc_address"] == *self.grpc_addr && v["data_address"] == *self.data_addr
                });
                if ours {
                    return Ok(());
                }
            }
            if Instant::now() >= until {
                return Err(format!(
                    "alb did not listen within {:?}; stderr:\n{}",
                    crate::START_DEADLINE,
                    self.stderr()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `/readyz` answers 200 (registered and serving).
    pub async fn wait_registered(&self) {
        crate::module::wait_registered("the ALB", &self.admin_addr, || self.stderr()).await;
    }

    /// A ModuleService client.
    pub async fn client(&self) -> ModuleServiceClient<Channel> {
        crate::module::module_client("the ALB", &self.grpc_addr, || self.stderr()).await
    }
}

impl std::ops::Deref for AlbProcess {
    type Target = crate::process::Spawned;
    fn deref(&self) -> &Self::Target {
        &self.process
    }
}

impl std::ops::DerefMut for AlbProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.process
    }
}

// ---------------------------------------------------------------------------
// curl

/// What one `curl` run for one URL gave.
#[derive(Debug, Clone)]
pub struct CurlResponse {
    /// curl's exit code (0: the transfer worked, whatever the status).
    pub exit: i32,
    /// The HTTP status (0 when there was none).
    pub status: u16,
    /// `%{http_version}`: `1.1`, `2`.
    pub version: String,
    /// `%{ssl_verify_result}`: 0 when the certificate was verified.
    pub ssl_verify_result: i64,
    /// The final response's headers, names lowercase, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// curl's stderr (with `-v`: the handshake and the headers).
    pub stderr: String,
}

impl CurlResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (an in-test origin's description of the request).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {self:?}"))
    }
}

fn curl_command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("curl");
    // No proxy or curlrc from the environment running the tests.
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.arg("-q")
        .args(["--max-time", CURL_MAX_TIME])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `curl` for one URL with `args` (plus `-sS`, a time limit, and the
/// head, body and write-out captured); panics only if curl cannot run or
/// hangs past [`CURL_DEADLINE`].
pub async fn curl(dir: &Path, args: &[&str]) -> CurlResponse {
    let n = next_id();
    let head_path = dir.join(format!("curl-{n}.head"));
    let body_path = dir.join(format!("curl-{n}.body"));
    let head = head_path.to_str().expect("a UTF-8 temp path").to_string();
    let body = body_path.to_str().expect("a UTF-8 temp path").to_string();
    let mut all: Vec<&str> = vec![
        "-sS",
        "-g",
        "-D",
        &head,
        "-o",
        &body,
        "-w",
        "%{http_code}|%{http_version}|%{ssl_verify_result}",
    ];
    all.extend_from_slice(args);
    let out = tokio::time::timeout(CURL_DEADLINE, curl_command(&all).output())
        .await
        .unwrap_or_else(|_| panic!("curl {args:?} did not end within {CURL_DEADLINE:?}"))
        .expect("run curl");
    let write_out = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut parts = write_out.trim().split('|');
    let status = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = parts.next().unwrap_or_default().to_string();
    let ssl_verify_result = parts.next().and_then(|s| s.parse().ok()).unwrap_or(-1);
    let head_text = std::fs::read_to_string(&head_path).unwrap_or_default();
    CurlResponse {
        exit: out.status.code().unwrap_or(-1),
        status,
        version,
        ssl_verify_result,
        headers: last_head(&head_text),
        body: std::fs::read(&body_path).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `curl -sS` with `args` (any number of URLs, globs allowed) and
/// returns its stdout; panics if curl fails.
pub async fn curl_stdout(args: &[&str]) -> String {
    let mut all: Vec<&str> = vec!["-sS"];
    all.extend_from_slice(args);
    let out = tokio::time::timeout(CURL_DEADLINE, curl_command(&all).output())
        .await
        .unwrap_or_else(|_| panic!("curl {args:?} did not end within {CURL_DEADLINE:?}"))
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The headers of the last response in a `curl -D` file (after any 1xx).
fn last_head(text: &str) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("HTTP/") {
            headers.clear();
        } else if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    headers
}

// ---------------------------------------------------------------------------
// nginx

/// A real nginx serving `root` on a loopback port; stopped on drop.
pub struct Nginx {
    child: Child,
    pub addr: String,
    dir: PathBuf,
}

impl Nginx {
    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker and exits; SIGKILL after a
        // while if it does not.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The nginx binary: `/usr/sbin/nginx` (Debian's), else `nginx` on PATH.
pub fn nginx_binary() -> PathBuf {
    let debian = PathBuf::from("/usr/sbin/nginx");
    if debian.is_file() {
        debian
    } else {
        PathBuf::from("nginx")
    }
}

/// Starts nginx (not as a daemon, everything it writes under `dir/nginx`)
/// serving the files under `root` on a free loopback port, and waits until
/// it answers; picks another port if one was taken first.
pub async fn start_nginx(dir: &Path, root: &Path) -> Nginx {
    let ngx_dir = dir.join("nginx");
    std::fs::create_dir_all(ngx_dir.join("temp")).expect("create the nginx dir");
    let version = Command::new(nginx_binary())
        .arg("-V")
        .output()
        .expect("run nginx -V: is nginx installed (scripts/test.sh installs nginx-light)?");
    let build = String::from_utf8_lossy(&version.stderr).into_owned();
    // Temp paths for the modules this build has (an unknown directive is
    // an error), all inside the sandbox.
    let mut temps = format!("client_body_temp_path {}/temp/body;\n", ngx_dir.display());
    for m in ["proxy", "fastcgi", "uwsgi", "scgi"] {
        if !build.contains(&format!("--without-http_{m}_module")) {
            temps.push_str(&format!(
                "    {m}_temp_path {}/temp/{m};\n",
                ngx_dir.display()
            ));
        }
    }
    // As root, workers would run as nobody and could not read the sandbox.
    let uid = std::fs::metadata(dir).map(|m| m.uid()).unwrap_or(1);
    let user = if uid == 0 { "user root root;" } else { "" };
    let mut last = String::new();
    for attempt in 0..5 {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let conf = format!(
            "{user}\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n    access_log {d}/access.log;\n    {temps}\n    \
             types {{ text/plain txt; application/octet-stream bin; }}\n    \
             default_type application/octet-stream;\n    \
             server {{\n        listen {addr};\n        root {root};\n    }}\n}}\n",
            d = ngx_dir.display(),
            root = root.display(),
        );
        let conf_path = ngx_dir.join(format!("nginx-{attempt}.conf"));
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let _ = std::fs::remove_file(ngx_dir.join("error.log"));
        let stderr_path = ngx_dir.join(format!("nginx-{attempt}.stderr"));
        let child = Command::new(nginx_binary())
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&ngx_dir)
            .arg("-e")
            .arg(ngx_dir.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).expect("nginx stderr file"))
            .spawn()
            .expect("spawn nginx");
        let mut ngx = Nginx {
            child,
            addr: addr.clone(),
            dir: ngx_dir.clone(),
        };
        let until = Instant::now() + crate::START_DEADLINE;
        loop {
            if let Ok(Some(status)) = ngx.child.try_wait() {
                last = format!(
                    "nginx exited with {status}; stderr:\n{}\nerror log:\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default(),
                    ngx.error_log()
                );
                break;
            }
            if http_get(&addr, "/").await.is_ok() {
                return ngx;
            }
            assert!(
                Instant::now() < until,
                "nginx did not answer on {addr} within {:?}; error log:\n{}",
                crate::START_DEADLINE,
                ngx.error_log()
            );
            tokio::time::sleep(POLL).await;
        }
        if !last.contains("in use") {
            panic!("{last}");
        }
    }
    panic!("could not start nginx on a free port: {last}");
}

// ---------------------------------------------------------------------------
// More SDK sections

/// Starts `alb` as [`spawn_alb`] does, with more top-level sections of the
/// SDK's config file next to `module:` (`data: {proxy_protocol: true}`,
/// `shutdown: ...`): each key of the JSON object `sdk` is added to the
/// generated config, replacing one the harness wrote.
pub fn spawn_alb_with_sdk(
    dir: &Path,
    nlb_addr: &str,
    launch: &AlbLaunch,
    sdk: &serde_json::Value,
) -> AlbProcess {
    let (grpc_addr, data_addr, admin_addr) = crate::free_addr3();
    let mut config = serde_json::json!({
        "nlb": {"addr": nlb_addr},
        "instance_id": launch.instance_id,
        "listen": {"grpc": grpc_addr, "data": data_addr, "admin": admin_addr},
        "module": launch.module,
    });
    for (k, v) in sdk.as_object().expect("the SDK sections as a JSON object") {
        config[k.as_str()] = v.clone();
    }
    let n = next_id();
    let config_path = dir.join(format!("alb-{n}.yaml"));
    let yaml = serde_yaml_ng::to_string(&config).expect("the ALB config as YAML");
    std::fs::write(&config_path, yaml).expect("write the ALB config");
    let mut cmd = Command::new(binary("alb"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("MODULE_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.arg("--config")
        .arg(&config_path)
        .env("MODULE_LOG", "info")
        .current_dir(dir)
        .stdin(Stdio::null());
    for (k, v) in &launch.env {
        cmd.env(k, v);
    }
    let stderr_path = dir.join(format!("alb-{n}.stderr"));
    cmd.stdout(File::create(dir.join(format!("alb-{n}.stdout"))).expect("stdout file"));
    cmd.stderr(File::create(&stderr_path).expect("stderr file"));
    let child = cmd.spawn().expect("spawn alb");
    AlbProcess {
        process: crate::process::Spawned::new(child, stderr_path, "alb"),
        instance_id: launch.instance_id.clone(),
        grpc_addr,
        data_addr,
        admin_addr,
        config_path,
    }
}

/// [`start_alb`] with more SDK sections, as [`spawn_alb_with_sdk`] takes
/// them: waits until the ports listen and the ALB registered, and starts
/// it again on new ports when another process took one first.
pub async fn start_alb_with_sdk(
    dir: &Path,
    nlb_addr: &str,
    launch: &AlbLaunch,
    sdk: &serde_json::Value,
) -> AlbProcess {
    let mut last = String::new();
    for _ in 0..5 {
        let mut alb = spawn_alb_with_sdk(dir, nlb_addr, launch, sdk);
        match alb.wait_listening().await {
            Ok(()) => {
                alb.wait_registered().await;
                return alb;
            }
            Err(e) if e.contains("in use") => last = e,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("could not start alb on free ports: {last}");
}

// ---------------------------------------------------------------------------
// Helpers the ALB test files share

/// An NLB on ports the harness picks, without a config file.
pub async fn start_nlb(sb: &crate::Sandbox) -> crate::NlbProcess {
    sb.start_with(crate::Launch {
        use_config_file: false,
        ..crate::Launch::default()
    })
    .await
}

/// An NLB and an ALB registered with it, the ALB's `module:` section as given.
pub async fn stack(
    sb: &crate::Sandbox,
    id: &str,
    module: serde_json::Value,
) -> (crate::NlbProcess, AlbProcess) {
    let nlb = start_nlb(sb).await;
    let alb = start_alb(sb.path(), &nlb.grpc_addr, &AlbLaunch::new(id, module)).await;
    (nlb, alb)
}

/// A cluster of in-test origins, each with weight 1.
pub fn cluster(name: &str, origins: &[&crate::origin::Origin]) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = origins
        .iter()
        .map(|o| serde_json::json!({"address": o.addr.to_string()}))
        .collect();
    serde_json::json!({"name": name, "endpoints": endpoints})
}

/// A header the origin received, from its JSON.
pub fn seen<'a>(answer: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    answer["headers"][name].as_str()
}
