//! The module process's own CPU and memory use, read from Linux procfs.
//!
//! - CPU time is `utime + stime` from `/proc/self/stat`, in clock ticks of
//!   [`USER_HZ`]. Linux reports these fields in `USER_HZ` units, which the
//!   kernel ABI fixes at 100 on every architecture Switchyard builds for
//!   (it is what `getconf CLK_TCK` prints); we use the constant rather than
//!   spawn `getconf` or call `sysconf` (which would need `unsafe`). A tick is
//!   10 ms, so CPU figures over short intervals are coarse; see
//!   [`CpuSampler::MIN_INTERVAL`].
//! - Resident memory is the second field of `/proc/self/statm` (pages) times
//!   the page size. The page size comes from the `AT_PAGESZ` entry of
//!   `/proc/self/auxv` (what the kernel told the process at exec, read as a
//!   plain file: no `unsafe`), and falls back to 4096 if that cannot be read.
//!   This matters on arm64 kernels built with 16 or 64 KiB pages.
//!
//! On other systems, or when a file cannot be read or parsed, the readers
//! return `None`; nothing here panics.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Clock ticks per second of the CPU-time fields in `/proc/<pid>/stat`
/// (Linux's `USER_HZ`, fixed at 100 by the kernel ABI).
pub const USER_HZ: u64 = 100;

/// The page size assumed when `/proc/self/auxv` cannot be read.
pub const DEFAULT_PAGE_SIZE: u64 = 4096;

/// `AT_PAGESZ` in the ELF auxiliary vector.
const AT_PAGESZ: usize = 6;
/// `AT_NULL`, the auxiliary vector's terminator.
const AT_NULL: usize = 0;

/// The fields we use from one `/proc/<pid>/stat` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatTimes {
    /// Field 14, `utime`: user-mode CPU time in ticks (all threads, living
    /// and exited).
    pub utime_ticks: u64,
    /// Field 15, `stime`: kernel-mode CPU time in ticks.
    pub stime_ticks: u64,
    /// Field 22, `starttime`: when the process started, in ticks after boot.
    pub start_ticks: u64,
}

impl StatTimes {
    /// User plus system CPU time.
    pub fn cpu_time(&self) -> Duration {
        ticks_to_duration(self.utime_ticks.saturating_add(self.stime_ticks))
    }

    /// When the process started, as time after boot.
    pub fn start_after_boot(&self) -> Duration {
        ticks_to_duration(self.start_ticks)
    }
}

/// Ticks of [`USER_HZ`] as a duration.
pub fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_secs(ticks / USER_HZ)
        + Duration::from_nanos((ticks % USER_HZ) * (1_000_000_000 / USER_HZ))
}

/// Parses a `/proc/<pid>/stat` line.
///
/// The second field, the command name, is wrapped in parentheses and may
/// itself contain spaces and parentheses (`1234 (my (odd) name) S ...`), so
/// the numeric fields are counted from the *last* `)`.
pub fn parse_stat(line: &str) -> Option<StatTimes> {
    let close = line.rfind(')')?;
    // Field 3 (`state`) is the first one after the command name.
    let mut fields = line.get(close + 1..)?.split_whitespace();
    // Fields 3..=13 come before utime; nth(11) is field 14.
    let utime_ticks = fields.nth(11)?.parse().ok()?;
    let stime_ticks = fields.next()?.parse().ok()?;
    // Fields 16..=21 come between stime and starttime.
    let start_ticks = fields.nth(6)?.parse().ok()?;
    Some(StatTimes {
        utime_ticks,
        stime_ticks,
        start_ticks,
    })
}

/// Parses `/proc/<pid>/statm` and returns its second field, the resident set
/// size in pages.
pub fn parse_statm_resident_pages(line: &str) -> Option<u64> {
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Parses `/proc/uptime` and returns its first field, the time since boot
/// (suspend included, the same clock `starttime` counts on).
pub fn parse_uptime(line: &str) -> Option<Duration> {
    let secs: f64 = line.split_whitespace().next()?.parse().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

/// Finds `AT_PAGESZ` in the bytes of `/proc/self/auxv`: native-endian
/// `(key, value)` pairs of machine words, ended by `AT_NULL`.
pub fn parse_auxv_page_size(auxv: &[u8]) -> Option<u64> {
    const WORD: usize = std::mem::size_of::<usize>();
    for pair in auxv.chunks_exact(2 * WORD) {
        let (key, value) = pair.split_at(WORD);
        let key = usize::from_ne_bytes(key.try_into().ok()?);
        let value = usize::from_ne_bytes(value.try_into().ok()?);
        match key {
            AT_NULL => return None,
            AT_PAGESZ => return u64::try_from(value).ok().filter(|&v| v > 0),
            _ => {}
        }
    }
    None
}

/// Whether this build reads Linux procfs at all.
const PROCFS: bool = cfg!(any(target_os = "linux", target_os = "android"));

fn read_proc(path: &str) -> Option<String> {
    if !PROCFS {
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// The system page size (from `/proc/self/auxv`, read once), or
/// [`DEFAULT_PAGE_SIZE`].
pub fn page_size() -> u64 {
    static PAGE_SIZE: OnceLock<u64> = OnceLock::new();
    *PAGE_SIZE.get_or_init(|| {
        PROCFS
            .then(|| std::fs::read("/proc/self/auxv").ok())
            .flatten()
            .and_then(|auxv| parse_auxv_page_size(&auxv))
            .unwrap_or(DEFAULT_PAGE_SIZE)
    })
}

/// This process's `/proc/self/stat` times.
pub fn stat_times() -> Option<StatTimes> {
    parse_stat(&read_proc("/proc/self/stat")?)
}

/// CPU time (user plus system, all threads) this process has used.
pub fn cpu_time() -> Option<Duration> {
    stat_times().map(|t| t.cpu_time())
}

/// This process's resident memory in bytes.
pub fn resident_memory_bytes() -> Option<u64> {
    let pages = parse_statm_resident_pages(&read_proc("/proc/self/statm")?)?;
    pages.checked_mul(page_size())
}

/// How long ago this process started, from `starttime` and `/proc/uptime`.
fn process_age(times: &StatTimes) -> Option<Duration> {
    let uptime = parse_uptime(&read_proc("/proc/uptime")?)?;
    uptime.checked_sub(times.start_after_boot())
}

/// One CPU-time reading.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    cpu: Duration,
}

/// CPU use of this process, in percent of one core, over the interval since
/// the previous sample.
///
/// 100 means one core fully busy; a process busy on several cores reads
/// above 100. The first sample averages over the whole life of the process
/// (from its start time in `/proc/self/stat`). A sample taken less than
/// [`MIN_INTERVAL`](Self::MIN_INTERVAL) after the previous one repeats the
/// previous figure and leaves the interval open, because with 10 ms ticks a
/// shorter interval is mostly rounding.
#[derive(Debug, Default)]
pub struct CpuSampler {
    prev: Option<Reading>,
    last_percent: Option<f64>,
}

impl CpuSampler {
    /// The shortest interval a new figure is computed over.
    pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        Self::default()
    }

    /// CPU % since the previous sample (see the type's docs), or `None` on
    /// systems without procfs or when it cannot be read.
    pub fn sample(&mut self) -> Option<f64> {
        let times = stat_times()?;
        let now = Instant::now();
        let age = if self.prev.is_none() {
            process_age(&times)
        } else {
            None
        };
        self.advance(now, times.cpu_time(), age)
    }

    /// The arithmetic of [`sample`](Self::sample), on given readings:
    /// `cpu` is the process's CPU time at `now`, and `age` (used only for
    /// the first sample) how long the process has been running.
    fn advance(&mut self, now: Instant, cpu: Duration, age: Option<Duration>) -> Option<f64> {
        let Some(prev) = self.prev else {
            self.prev = Some(Reading { at: now, cpu });
            self.last_percent = age.map(|age| percent(cpu, age));
            return self.last_percent;
        };
        let wall = now.saturating_duration_since(prev.at);
        if wall < Self::MIN_INTERVAL {
            return self.last_percent;
        }
        let pct = percent(cpu.saturating_sub(prev.cpu), wall);
        self.prev = Some(Reading { at: now, cpu });
        self.last_percent = Some(pct);
        Some(pct)
    }
}

/// `cpu` as a percentage of `wall` (0 for an empty interval).
fn percent(cpu: Duration, wall: Duration) -> f64 {
    if wall.is_zero() {
        return 0.0;
    }
    cpu.as_secs_f64() / wall.as_secs_f64() * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 1523 0 12 0 \
        250 75 3 4 20 0 4 0 98765 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 \
        4096 17122 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn parses_stat_with_parentheses_and_spaces_in_the_name() {
        let t = parse_stat(STAT).expect("parses");
        assert_eq!(
            t,
            StatTimes {
                utime_ticks: 250,
                stime_ticks: 75,
                start_ticks: 98765,
            }
        );
        assert_eq!(t.cpu_time(), Duration::from_millis(3250));
        assert_eq!(t.start_after_boot(), Duration::from_millis(987_650));
    }

    #[test]
    fn a_name_that_looks_like_fields_does_not_shift_them() {
        let line = "7 (x) 1 2 3 4 5 6 7 8 9 10 11 12) R 1 7 7 0 -1 0 0 0 0 0 \
            9 8 0 0 20 0 1 0 42 0 0";
        let t = parse_stat(line).expect("parses");
        assert_eq!((t.utime_ticks, t.stime_ticks, t.start_ticks), (9, 8, 42));
    }

    #[test]
    fn malformed_stat_lines_are_none() {
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("1234 (name"), None);
        assert_eq!(parse_stat("1234 (name) S 1 2 3"), None);
        assert_eq!(
            parse_stat("1 (n) S 1 1 1 0 -1 0 0 0 0 0 x 75 0 0 20 0 1 0 5"),
            None
        );
        assert_eq!(
            parse_stat("1 (n) S 1 1 1 0 -1 0 0 0 0 0 -5 75 0 0 20 0 1 0 5"),
            None
        );
    }

    #[test]
    fn parses_statm_and_uptime() {
        assert_eq!(
            parse_statm_resident_pages("12345 678 90 12 0 3456 0\n"),
            Some(678)
        );
        assert_eq!(parse_statm_resident_pages("12345"), None);
        assert_eq!(parse_statm_resident_pages("1 x 2"), None);
        assert_eq!(
            parse_uptime("350735.47 234388.90\n"),
            Some(Duration::from_millis(350_735_470))
        );
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("-1 2"), None);
    }

    fn auxv(pairs: &[(usize, usize)]) -> Vec<u8> {
        pairs
            .iter()
            .flat_map(|&(k, v)| [k.to_ne_bytes(), v.to_ne_bytes()])
            .flatten()
            .collect()
    }

    #[test]
    fn finds_the_page_size_in_auxv() {
        assert_eq!(
            parse_auxv_page_size(&auxv(&[(33, 0xdead), (6, 16384), (0, 0)])),
            Some(16384)
        );
        assert_eq!(
            parse_auxv_page_size(&auxv(&[(33, 1), (0, 0), (6, 8)])),
            None
        );
        assert_eq!(parse_auxv_page_size(&auxv(&[(33, 1)])), None);
        let mut cut = auxv(&[(6, 4096)]);
        cut.pop();
        assert_eq!(parse_auxv_page_size(&cut), None);
    }

    #[test]
    fn ticks_are_hundredths_of_a_second() {
        assert_eq!(ticks_to_duration(0), Duration::ZERO);
        assert_eq!(ticks_to_duration(1), Duration::from_millis(10));
        assert_eq!(ticks_to_duration(12_345), Duration::from_millis(123_450));
    }

    #[test]
    fn sampler_arithmetic() {
        let t0 = Instant::now();
        let mut s = CpuSampler::new();
        // First sample: average since the process started 10 s ago.
        let first = s.advance(t0, Duration::from_secs(2), Some(Duration::from_secs(10)));
        assert_eq!(first, Some(20.0));
        // Too soon: the previous figure again, interval still open.
        let soon = s.advance(
            t0 + Duration::from_millis(500),
            Duration::from_secs(3),
            None,
        );
        assert_eq!(soon, Some(20.0));
        // 1 s of CPU over 2 s since the first sample.
        let later = s.advance(t0 + Duration::from_secs(2), Duration::from_secs(3), None);
        assert_eq!(later, Some(50.0));
        // Two busy cores read above 100.
        let busy = s.advance(t0 + Duration::from_secs(4), Duration::from_secs(7), None);
        assert_eq!(busy, Some(200.0));
    }

    #[test]
    fn first_sample_without_a_process_age_is_none_then_recovers() {
        let t0 = Instant::now();
        let mut s = CpuSampler::new();
        assert_eq!(s.advance(t0, Duration::from_secs(1), None), None);
        assert_eq!(
            s.advance(t0 + Duration::from_millis(10), Duration::from_secs(1), None),
            None
        );
        let p = s.advance(t0 + Duration::from_secs(4), Duration::from_secs(2), None);
        assert_eq!(p, Some(25.0));
    }

    /// Some CPU work the optimiser cannot remove.
    fn burn(iterations: u64) -> u64 {
        let mut x = 0u64;
        for i in 0..iterations {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i));
        }
        x
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn live_readings_on_linux() {
        assert!(resident_memory_bytes().expect("statm readable") > 0);
        let auxv = std::fs::read("/proc/self/auxv").expect("auxv readable");
        assert_eq!(parse_auxv_page_size(&auxv), Some(page_size()));
        assert!(page_size() >= 4096 && page_size().is_power_of_two());
        let start = cpu_time().expect("stat readable");

        // Burn until the process has used at least two ticks more, within a
        // bounded number of rounds.
        let mut sampler = CpuSampler::new();
        for _ in 0..2_000 {
            burn(1_000_000);
            if cpu_time().expect("stat readable") >= start + Duration::from_millis(20) {
                break;
            }
        }
        let first = sampler.sample().expect("first sample");
        assert!(first > 0.0, "first sample {first}");

        // A second figure, over an interval that is all burning.
        let t = Instant::now();
        let mut rounds = 0;
        while t.elapsed() < CpuSampler::MIN_INTERVAL + Duration::from_millis(50) && rounds < 100_000
        {
            burn(100_000);
            rounds += 1;
        }
        let second = sampler.sample().expect("second sample");
        assert!(second > 0.0, "second sample {second}");
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    #[test]
    fn elsewhere_the_readers_are_none() {
        assert_eq!(cpu_time(), None);
        assert_eq!(resident_memory_bytes(), None);
        assert_eq!(CpuSampler::new().sample(), None);
        assert_eq!(page_size(), DEFAULT_PAGE_SIZE);
    }
}
