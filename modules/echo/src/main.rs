//! `echo-module`: the smallest useful Switchyard module, and the example of
//! `docs/modules.md`. It greets each connection, then echoes every line
//! back, counting each line as a request (with its latency) and checking
//! the rate limits set through `SetRateLimit`.
//!
//! ```yaml
//! module:
//!   greeting: "hello from echo"    # sent first; reloadable
//!   routes:                        # announced to the NLB
//!     - {route_id: echo, protocol: TCP, destination_port: 7000}
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use serde::Deserialize;
use switchyard_sdk::pb::{ModuleType, Protocol, Route};
use switchyard_sdk::{ConfigSection, Connection, Descriptor, Module, ModuleError, RouteStore};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The `module:` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
struct EchoConfig {
    greeting: String,
    routes: Vec<RouteConfig>,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            greeting: "hello from echo".into(),
            routes: vec![RouteConfig {
                route_id: "echo".into(),
                protocol: "TCP".into(),
                destination_port: 0,
                priority: 0,
            }],
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RouteConfig {
    route_id: String,
    protocol: String,
    #[serde(default)]
    destination_port: i32,
    #[serde(default)]
    priority: i32,
}

impl EchoConfig {
    fn parse(section: serde_yaml_ng::Value) -> Result<Self, Vec<String>> {
        let c: EchoConfig = if section.is_null() {
            EchoConfig::default()
        } else {
            serde_yaml_ng::from_value(section).map_err(|e| vec![e.to_string()])?
        };
        if c.greeting.contains('\n') {
            return Err(vec!["greeting: must be one line".into()]);
        }
        Ok(c)
    }

    fn routes(&self) -> Result<Vec<Route>, Vec<String>> {
        self.routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let name = format!("PROTOCOL_{}", r.protocol.to_ascii_uppercase());
                let protocol = Protocol::from_str_name(&name)
                    .ok_or_else(|| format!("routes[{i}].protocol: unknown {:?}", r.protocol))?;
                Ok(Route {
                    route_id: r.route_id.clone(),
                    protocol: protocol as i32,
                    destination_port: r.destination_port,
                    priority: r.priority,
                    ..Route::default()
                })
            })
            .collect::<Result<_, String>>()
            .map_err(|e| vec![e])
    }
}

struct Echo {
    greeting: RwLock<Arc<str>>,
    routes: RouteStore,
}

impl Echo {
    fn new(config: EchoConfig) -> Result<Self, Vec<String>> {
        let routes = RouteStore::new(config.routes()?).map_err(|e| vec![e.to_string()])?;
        Ok(Echo {
            greeting: RwLock::new(config.greeting.into()),
            routes,
        })
    }
}

#[switchyard_sdk::async_trait]
impl Module for Echo {
    fn descriptor(&self) -> Descriptor {
        Descriptor {
            // The contract has no "other" type: echo registers as an ALB
            // serving plain TCP.
            module_type: ModuleType::Alb,
            name: "echo",
            version: env!("CARGO_PKG_VERSION").into(),
            protocols: vec![Protocol::Tcp],
            capabilities: HashMap::from([("example".to_string(), "echo".to_string())]),
        }
    }

    async fn serve(&self, mut conn: Connection) {
        let greeting = self.greeting.read().clone();
        let client = conn.client;
        let ctx = conn.ctx.clone();
        let (r, mut w) = tokio::io::split(conn.stream);
        if w.write_all(format!("{greeting} ({client})\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        let mut r = BufReader::new(r);
        loop {
            let line = tokio::select! {
                l = next_line(&mut r) => l,
                _ = conn.closing.wait() => {
                    let _ = w.write_all(b"bye: the module is closing this connection\n").await;
                    return;
                }
            };
            let line = match line {
                Ok(Some(line)) => line,
                Ok(None) => return,
                Err(e) => {
                    let _ = w.write_all(format!("error: {e}\n").as_bytes()).await;
                    return;
                }
            };
            let started = Instant::now();
            let reply = match ctx.limits.check(&["*", "route:echo"], Some(client.ip())) {
                Ok(()) => format!("{line}\n"),
                Err(refused) => format!("rate limited: retry in {}s\n", refused.retry_after_secs()),
            };
            let ok = w.write_all(reply.as_bytes()).await.is_ok();
            ctx.stats.record_request(started.elapsed(), ok);
            if !ok {
                return;
            }
        }
    }

    fn routes(&self) -> Vec<Route> {
        self.routes.list()
    }

    async fn update_routes(
        &self,
        routes: Vec<Route>,
        replace_all: bool,
    ) -> Result<usize, ModuleError> {
        self.routes.update(routes, replace_all)
    }

    async fn delete_route(&self, route_id: &str) -> Result<(), ModuleError> {
        self.routes.delete(route_id)
    }

    fn config(&self) -> Vec<ConfigSection> {
        vec![ConfigSection {
            config_type: "greeting".into(),
            data: self.greeting.read().as_bytes().to_vec(),
        }]
    }

    async fn update_config(
        &self,
        config_type: &str,
        data: &[u8],
        validate_only: bool,
    ) -> Result<(), Vec<String>> {
        if config_type != "greeting" {
            return Err(vec![format!(
                "unknown section {config_type:?} (echo has: greeting)"
            )]);
        }
        let text =
            std::str::from_utf8(data).map_err(|_| vec!["greeting: is not UTF-8".to_string()])?;
        let text = text.trim_end_matches('\n');
        if text.is_empty() || text.contains('\n') {
            return Err(vec!["greeting: must be one non-empty line".into()]);
        }
        if !validate_only {
            *self.greeting.write() = text.into();
        }
        Ok(())
    }

    async fn reload(&self, section: serde_yaml_ng::Value) -> Result<String, ModuleError> {
        let c = EchoConfig::parse(section).map_err(|e| ModuleError::Invalid(e.join("; ")))?;
        let routes = c.routes().map_err(|e| ModuleError::Invalid(e.join("; ")))?;
        self.routes.update(routes, true)?;
        *self.greeting.write() = c.greeting.into();
        Ok("greeting and routes re-read".into())
    }

    fn custom_stats(&self) -> HashMap<String, String> {
        HashMap::from([(
            "greeting_bytes".to_string(),
            self.greeting.read().len().to_string(),
        )])
    }
}

/// The longest line echo reads: a client cannot make it buffer without end.
const MAX_LINE: usize = 64 * 1024;

/// The next line without its newline; `None` at the end of the stream.
async fn next_line<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("line longer than {MAX_LINE} bytes"),
        ));
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "line is not UTF-8"))
}

fn main() -> ExitCode {
    switchyard_sdk::main("echo-module", |section| {
        Echo::new(EchoConfig::parse(section)?)
    })
}
