//! The harness of the L4 fault tests (`tests/l4_faults.rs`): an NLB with
//! data-plane listeners on fixed free ports, in-test instances registered
//! over `RegisterModule`, line-oriented clients, and bounded load loops that
//! record every connection's outcome.
//!
//! A failed connection is one the client saw refused, reset, closed before
//! its answer, or unanswered within [`STEP`].

use std::collections::BTreeMap;
use std::net::TcpListener as StdListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shared_types::pb::{self, HealthStatus, ModuleType, Protocol};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::{poll_until, Launch, NlbProcess, Sandbox, CHANGE_DEADLINE};

/// Deadline for one step of one client connection (connect, one answer).
pub const STEP: Duration = Duration::from_secs(10);
/// Hard bound on how long any load loop runs.
pub const LOAD_LIMIT: Duration = Duration::from_secs(120);
/// Hard bound on connections per load worker.
pub const LOAD_MAX_PER_WORKER: usize = 5_000;

/// One data-plane listener of a test config.
#[derive(Debug, Clone, Copy)]
pub struct Lsn {
    pub name: &'static str,
    pub protocol: &'static str,
    pub max_connections: u32,
}

/// A listener without a connection limit of its own.
pub const fn lsn(name: &'static str, protocol: &'static str) -> Lsn {
    Lsn {
        name,
        protocol,
        max_connections: 0,
    }
}

/// `127.0.0.1:<port>` for each name, the ports picked free together.
pub fn pick_addrs(names: &[&str]) -> BTreeMap<String, String> {
    let held: Vec<StdListener> = names
        .iter()
        .map(|_| StdListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    names
        .iter()
        .zip(&held)
        .map(|(n, l)| (n.to_string(), l.local_addr().expect("addr").to_string()))
        .collect()
}

/// The config file: `extra` (an object of other sections) plus `listeners`.
pub fn config_yaml(listeners: &[Lsn], addrs: &BTreeMap<String, String>, extra: &Value) -> String {
    let mut doc = extra.clone();
    doc["listeners"] = listeners
        .iter()
        .map(|l| {
            json!({
                "name": l.name,
                "bind": addrs[l.name],
                "protocol": l.protocol,
                "max_connections": l.max_connections,
            })
        })
        .collect();
    serde_yaml_ng::to_string(&doc).expect("the config serializes")
}

/// Starts `nlb` with these listeners (on free ports, picked again if one
/// was taken before the NLB bound it) and the other sections in `extra`.
/// Returns the process and each listener's address.
pub async fn start_nlb(
    sb: &Sandbox,
    listeners: &[Lsn],
    extra: &Value,
) -> (NlbProcess, BTreeMap<String, String>) {
    let names: Vec<&str> = listeners.iter().map(|l| l.name).collect();
    let mut last = String::new();
    for _ in 0..5 {
        let addrs = pick_addrs(&names);
        sb.write_config(&config_yaml(listeners, &addrs, extra));
        let mut p = sb.spawn(&Launch::default());
        match p.wait_ready().await {
            Ok(()) => return (p, addrs),
            Err(e) if e.contains("in use") => last = e,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("could not start nlb on free ports: {last}");
}

/// The admin port's `/metrics`: the sum of the series `name` whose labels
/// include all of `labels` (any order; the full set picks one series); 0
/// when there is none.
pub async fn metric(nlb: &NlbProcess, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(&nlb.get("/metrics").await.body, name, labels)
}

/// As [`metric`], from a `/metrics` text.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(r) = rest.strip_prefix('{') {
            match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let have: Vec<(&str, &str)> = label_text
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        if labels.iter().all(|want| have.contains(want)) {
            sum += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

// ---------------------------------------------------------------------------
// Instances

/// An in-test server standing in for an instance's data port (or a static
/// backend): it greets each connection with its tag on a line of its own,
/// then echoes every line (or trailing bytes) until the client closes, then
/// closes.
pub struct Backend {
    pub addr: String,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a [`Backend`] greeting with `tag` on a free loopback port.
pub async fn backend(tag: &'static str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(greet_and_echo(s, tag));
        }
    });
    Backend {
        addr,
        accepted,
        task,
    }
}

async fn greet_and_echo(s: TcpStream, tag: &'static str) {
    let (r, mut w) = s.into_split();
    if w.write_all(format!("{tag}\n").as_bytes()).await.is_err() {
        return;
    }
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if w.write_all(&line).await.is_err() {
            return;
        }
    }
}

/// Registers an in-test instance of the ALB type whose data port is
/// `data_addr`, announcing a `TCP` route on any port. Its ModuleService is a
/// fake that answers health checks; the heartbeat interval is an hour, so
/// its lease holds for the whole test without heartbeats. Returns the
/// registration id.
pub async fn register(nlb: &NlbProcess, id: &str, data_addr: &str) -> String {
    let service = crate::control::serve_fake_module().await;
    let resp = nlb
        .client()
        .await
        .register_module(pb::RegisterModuleRequest {
            instance: Some(pb::ModuleInstance {
                instance_id: id.into(),
                module_type: ModuleType::Alb as i32,
                address: service,
                health_status: HealthStatus::Healthy as i32,
                metadata: [("data_address".to_string(), data_addr.to_string())].into(),
                version: "1.0.0".into(),
                ..Default::default()
            }),
            initial_routes: vec![crate::control::route("any-tcp", Protocol::Tcp, 0)],
            health_config: Some(pb::HealthCheckConfig {
                interval_seconds: 3600,
                ..Default::default()
            }),
            capabilities: Default::default(),
        })
        .await
        .unwrap_or_else(|s| panic!("register {id}: {s:?}"))
        .into_inner();
    assert!(resp.success, "register {id}: {resp:?}");
    resp.registration_id
}

// ---------------------------------------------------------------------------
// Clients

/// A client connection through the NLB, line by line.
pub struct Client {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Client {
    /// Connects to `addr`, from the loopback address `from` if given.
    pub async fn connect(addr: &str, from: Option<&str>) -> Result<Client, String> {
        let connect = async {
            match from {
                None => TcpStream::connect(addr).await,
                Some(ip) => {
                    let socket = TcpSocket::new_v4()?;
                    socket.bind(format!("{ip}:0").parse().expect("an IPv4 address"))?;
                    socket.connect(addr.parse().expect("an ip:port")).await
                }
            }
        };
        let s = tokio::time::timeout(STEP, connect)
            .await
            .map_err(|_| format!("connect to {addr}: unanswered within {STEP:?}"))?
            .map_err(|e| format!("connect to {addr}: {e} ({:?})", e.kind()))?;
        let (r, w) = s.into_split();
        Ok(Client {
            r: BufReader::new(r),
            w,
        })
    }

    /// The next line, without its line end. A close before it is a failure.
    pub async fn line(&mut self) -> Result<String, String> {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(STEP, self.r.read_until(b'\n', &mut buf))
            .await
            .map_err(|_| format!("no answer within {STEP:?}"))?
            .map_err(|e| format!("read: {e} ({:?})", e.kind()))?;
        if n == 0 || buf.last() != Some(&b'\n') {
            return Err(format!(
                "closed before a whole line ({} bytes of one)",
                buf.len()
            ));
        }
        Ok(String::from_utf8_lossy(&buf)
            .trim_end_matches(['\r', '\n'])
            .to_string())
    }

    /// Writes all of `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        tokio::time::timeout(STEP, self.w.write_all(bytes))
            .await
            .map_err(|_| format!("write stalled for {STEP:?}"))?
            .map_err(|e| format!("write: {e} ({:?})", e.kind()))
    }

    /// Sends a line and checks that it comes back.
    pub async fn ask(&mut self, text: &str) -> Result<(), String> {
        self.send(format!("{text}\n").as_bytes()).await?;
        let got = self.line().await?;
        if got == text {
            Ok(())
        } else {
            Err(format!("sent {text:?}, got back {got:?}"))
        }
    }

    /// Ends our sending side (a FIN); reading goes on.
    pub async fn half_close(&mut self) -> Result<(), String> {
        self.w
            .shutdown()
            .await
            .map_err(|e| format!("shutdown: {e}"))
    }

    /// Reads until the other side closes; what came. A reset or no close
    /// within [`STEP`] is a failure.
    pub async fn read_rest(&mut self) -> Result<Vec<u8>, String> {
        let mut rest = Vec::new();
        tokio::time::timeout(STEP, self.r.read_to_end(&mut rest))
            .await
            .map_err(|_| format!("not closed within {STEP:?}"))?
            .map_err(|e| format!("read to the end: {e} ({:?})", e.kind()))?;
        Ok(rest)
    }

    /// Half-closes (no more requests) and reads what is left until the
    /// other side closes too: a clean end.
    pub async fn finish(mut self) -> Result<Vec<u8>, String> {
        self.half_close().await?;
        self.read_rest().await
    }
}

/// One short connection: connect, read the greeting (the instance's tag:
/// its first word), send a line, check its echo, close cleanly. Returns the
/// tag.
pub async fn exchange(addr: &str, from: Option<&str>, text: &str) -> Result<String, String> {
    let mut c = Client::connect(addr, from).await?;
    let greeting = c.line().await?;
    c.ask(text).await?;
    let rest = c.finish().await?;
    if !rest.is_empty() {
        return Err(format!("{} unexpected bytes after the echo", rest.len()));
    }
    Ok(greeting
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// One short HTTP/1 connection on a sniffing listener: the client speaks
/// first, so the NLB can tell the protocol; then the greeting (the tag) and
/// the echo of the request line. Returns the tag.
pub async fn http_exchange(addr: &str, path: &str) -> Result<String, String> {
    let mut c = Client::connect(addr, None).await?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: good.test\r\n\r\n");
    c.send(head.as_bytes()).await?;
    let tag = c.line().await?;
    let echoed = c.line().await?;
    if echoed != format!("GET {path} HTTP/1.1") {
        return Err(format!("request line echoed as {echoed:?}"));
    }
    let rest = c.finish().await?;
    if rest != b"Host: good.test\r\n\r\n" {
        return Err(format!(
            "rest of the head echoed as {:?}",
            String::from_utf8_lossy(&rest)
        ));
    }
    Ok(tag)
}

/// One connection of a load loop.
#[derive(Debug)]
pub struct Attempt {
    pub started: Instant,
    pub ended: Instant,
    /// The instance's tag, or why the connection failed.
    pub result: Result<String, String>,
}

/// A steady load: `workers` loops, each opening one short connection at a
/// time (with `pause` between them), until stopped, [`LOAD_LIMIT`] passes
/// or [`LOAD_MAX_PER_WORKER`] connections were made.
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    workers: Vec<JoinHandle<Vec<Attempt>>>,
}

/// What each connection of a [`Load`] does.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// [`exchange`]: the instance speaks first.
    Echo,
    /// [`http_exchange`]: the client speaks first.
    Http,
}

/// Starts a [`Load`] on `addr`.
pub fn start_load(addr: &str, kind: Kind, workers: usize, pause: Duration) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let workers = (0..workers)
        .map(|w| {
            let (addr, stop, done) = (addr.to_string(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let begun = Instant::now();
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed)
                    && begun.elapsed() < LOAD_LIMIT
                    && out.len() < LOAD_MAX_PER_WORKER
                {
                    let started = Instant::now();
                    let name = format!("w{w}-{}", out.len());
                    let result = match kind {
                        Kind::Echo => exchange(&addr, None, &name).await,
                        Kind::Http => http_exchange(&addr, &format!("/{name}")).await,
                    };
                    out.push(Attempt {
                        started,
                        ended: Instant::now(),
                        result,
                    });
                    done.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(pause).await;
                }
                out
            })
        })
        .collect();
    Load {
        stop,
        done,
        workers,
    }
}

impl Load {
    /// Connections made so far, in all.
    pub fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` connections were made in all.
    pub async fn wait_done(&self, n: usize, logs: impl Fn() -> String) {
        poll_until(&format!("{n} load connections"), logs, || async {
            (self.done() >= n).then_some(())
        })
        .await;
    }

    /// Stops the loops; every attempt, in the order they started.
    pub async fn stop(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for w in self.workers {
            all.extend(w.await.expect("a load worker"));
        }
        all.sort_by_key(|a| a.started);
        all
    }
}

/// The attempts that failed.
pub fn failures(attempts: &[Attempt]) -> Vec<&Attempt> {
    attempts.iter().filter(|a| a.result.is_err()).collect()
}

/// A held connection kept busy: one echoed line every `every` until `stop`.
/// Ends with the connection and how many lines came back, or the first
/// failure.
pub fn chatter(
    mut c: Client,
    name: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(Client, Result<usize, String>)> {
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) && n < 10_000 {
            if let Err(e) = c.ask(&format!("{name}-{n}")).await {
                return (c, Err(format!("{name}: line {n}: {e}")));
            }
            n += 1;
            tokio::time::sleep(every).await;
        }
        (c, Ok(n))
    })
}

/// Opens `n` connections to `addr` after one another and returns each
/// outcome (the tag, or why it failed).
pub async fn exchanges(
    addr: &str,
    from: Option<&str>,
    n: usize,
    name: &str,
) -> Vec<Result<String, String>> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(exchange(addr, from, &format!("{name}-{i}")).await);
    }
    out
}

/// Polls until a new connection to `addr` fails (its listener closed):
/// refused, or reset when it raced the close in the accept queue. Every
/// connection accepted before that must be served.
pub async fn wait_refused(nlb: &NlbProcess, addr: &str) -> String {
    let until = Instant::now() + CHANGE_DEADLINE;
    loop {
        let mut c = match Client::connect(addr, None).await {
            Err(e) => return e,
            Ok(c) => c,
        };
        match c.line().await {
            Err(e) => return e,
            Ok(_greeting) => {
                let served = match c.ask("still").await {
                    Ok(()) => c.finish().await.map(drop),
                    Err(e) => Err(e),
                };
                if let Err(e) = served {
                    panic!(
                        "an accepted connection is served: {e}; stderr:\n{}",
                        nlb.stderr()
                    );
                }
            }
        }
        assert!(
            Instant::now() < until,
            "new connections to {addr} still accepted after {:?}; stderr:\n{}",
            CHANGE_DEADLINE,
            nlb.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The port of `ip:port`.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("ip:port")
}
