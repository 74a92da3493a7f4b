//! CPU time of a process from `/proc/<pid>/stat` (utime + stime).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux if unknown).
pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// utime + stime of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count
    // fields from the last ')'. After it come field 3 (state) onwards, so
    // utime (field 14) and stime (field 15) are the 12th and 13th.
    let Some((_, rest)) = text.rsplit_once(')') else {
        bail!("{path}: no ')' in {text:?}");
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize, name: &str| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{path}: no {name} field"))
    };
    Ok(field(11, "utime")? + field(12, "stime")?)
}

/// Resident memory of `pid` in MiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_mib(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{path}: no VmRSS"))?;
    Ok(kib / 1024.0)
}

/// A CPU reading to measure a window from.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    ticks: u64,
    at: Instant,
}

impl CpuMark {
    pub fn now(pid: u32) -> Result<Self> {
        Ok(CpuMark {
            ticks: cpu_ticks(pid)?,
            at: Instant::now(),
        })
    }

    /// CPU used since `self`, as a percentage of one core, and the window.
    pub fn percent_of_one_core_until(&self, end: &CpuMark) -> (f64, Duration) {
        let wall = end.at.saturating_duration_since(self.at);
        let cpu_s = end.ticks.saturating_sub(self.ticks) as f64 / clock_ticks_per_second() as f64;
        (100.0 * cpu_s / wall.as_secs_f64().max(1e-9), wall)
    }
}
