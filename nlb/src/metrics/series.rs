//! Bounded per-owner time series: each owner (a module instance, or `nlb`)
//! holds at most `max_series` series (name + labels), each a ring of at most
//! `retention` points. Old points fall off; new series past the cap are
//! refused, so one module cannot grow the NLB's memory without bound.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};

use parking_lot::Mutex;
use shared_types::pb::MetricDataPoint;
use shared_types::time::{from_unix_millis, to_system, unix_millis};

/// The owner name of the NLB's own series: empty, which no instance id can
/// be, so a module cannot write into or delete the NLB's series.
pub const NLB_OWNER: &str = "";

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SeriesKey {
    name: String,
    labels: BTreeMap<String, String>,
}

impl SeriesKey {
    fn of(p: &MetricDataPoint) -> Self {
        SeriesKey {
            name: p.name.clone(),
            labels: p
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// A point's time in Unix milliseconds, `default` when it has none.
fn stamp(p: &MetricDataPoint, default: u64) -> u64 {
    p.timestamp
        .as_ref()
        .map_or(default, |t| unix_millis(to_system(t)))
}

/// One series: its key and its ring of (time, value), oldest first.
#[derive(Debug)]
struct Series {
    key: SeriesKey,
    ring: VecDeque<(u64, f64)>,
}

/// An owner's series, found by a hash of their key (the name and the labels,
/// in any order), so that recording a point into an existing series
/// allocates nothing. An owner holds a handful of series (at most
/// `max_series`), so they sit in a vector, their hashes side by side for a
/// scan that touches little memory.
#[derive(Debug, Default)]
struct Owner {
    hashes: Vec<u64>,
    series: Vec<Series>,
}

impl Owner {
    /// The ring of the series `name` + `labels` (hash `hash`), created if it
    /// is new and the owner holds fewer than `max_series`; `None` if refused.
    fn ring<'l>(
        &mut self,
        hash: u64,
        name: &str,
        labels: impl Iterator<Item = (&'l str, &'l str)> + Clone,
        max_series: usize,
    ) -> Option<&mut VecDeque<(u64, f64)>> {
        let n = labels.clone().count();
        let found = self
            .hashes
            .iter()
            .enumerate()
            .filter(|(_, h)| **h == hash)
            .map(|(i, _)| i)
            .find(|i| {
                let key = &self.series[*i].key;
                key.name == name
                    && key.labels.len() == n
                    && labels
                        .clone()
                        .all(|(k, v)| key.labels.get(k).is_some_and(|have| have == v))
            });
        let at = match found {
            Some(at) => at,
            None if self.series.len() >= max_series => return None,
            None => {
                self.hashes.push(hash);
                self.series.push(Series {
                    key: SeriesKey {
                        name: name.to_string(),
                        labels: labels
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                    },
                    ring: VecDeque::new(),
                });
                self.series.len() - 1
            }
        };
        Some(&mut self.series[at].ring)
    }

    fn series(&self) -> impl Iterator<Item = &Series> {
        self.series.iter()
    }
}

/// Adds a point to a ring kept in time order (a late point goes in its
/// place), dropping the oldest past `retention`.
fn push_point(ring: &mut VecDeque<(u64, f64)>, ts: u64, value: f64, retention: usize) {
    // Points mostly arrive in order: then only the newest one is read (a
    // binary search would read a cold ring in several places).
    if ring.back().is_none_or(|(t, _)| *t <= ts) {
        ring.push_back((ts, value));
    } else {
        let pos = ring.partition_point(|(t, _)| *t <= ts);
        ring.insert(pos, (ts, value));
    }
    while ring.len() > retention {
        ring.pop_front();
    }
}

/// What a `record` call kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recorded {
    pub accepted: usize,
    /// Points refused because their series would pass the per-owner cap.
    pub refused_new_series: usize,
}

/// Limits on a stored point.
pub const MAX_NAME_LEN: usize = 200;
pub const MAX_LABELS: usize = 16;
pub const MAX_LABEL_KEY_LEN: usize = 128;
pub const MAX_LABEL_VALUE_LEN: usize = 256;
/// Most points one `Get*Metrics` answer carries (about 70 bytes each, well
/// inside the default 4 MiB message limit).
pub const MAX_POINTS_PER_ANSWER: usize = 50_000;

/// The series of `o` whose name is in `names` (empty = all), by key.
fn matching<'o>(o: &'o Owner, names: &[String]) -> Vec<&'o Series> {
    let mut series: Vec<&Series> = o
        .series()
        .filter(|s| names.is_empty() || names.contains(&s.key.name))
        .collect();
    series.sort_by(|a, b| a.key.cmp(&b.key));
    series
}

/// The store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct SeriesStore {
    owners: Mutex<HashMap<String, Owner>>,
    limits: Mutex<(usize, usize)>,
    /// Keys the hashes of series keys (per process: no client picks collisions).
    hasher: RandomState,
}

impl SeriesStore {
    pub fn new(retention: usize, max_series: usize) -> Self {
        SeriesStore {
            owners: Mutex::new(HashMap::new()),
            limits: Mutex::new((retention.max(1), max_series.max(1))),
            hasher: RandomState::new(),
        }
    }

    pub fn set_limits(&self, retention: usize, max_series: usize) {
        *self.limits.lock() = (retention.max(1), max_series.max(1));
    }

    /// Checks points before any is stored; the error names the bad one.
    pub fn validate(points: &[MetricDataPoint]) -> Result<(), String> {
        for (i, p) in points.iter().enumerate() {
            if p.name.is_empty() || p.name.len() > MAX_NAME_LEN {
                return Err(format!(
                    "metrics.metrics[{i}].name: must be 1 to {MAX_NAME_LEN} characters"
                ));
            }
            if !p.value.is_finite() {
                return Err(format!(
                    "metrics.metrics[{i}] ({}): value {} is not a finite number",
                    p.name, p.value
                ));
            }
            if p.labels.len() > MAX_LABELS {
                return Err(format!(
                    "metrics.metrics[{i}] ({}): {} labels, at most {MAX_LABELS}",
                    p.name,
                    p.labels.len()
                ));
            }
            if let Some((k, v)) = p
                .labels
                .iter()
                .find(|(k, v)| k.len() > MAX_LABEL_KEY_LEN || v.len() > MAX_LABEL_VALUE_LEN)
            {
                return Err(format!(
                    "metrics.metrics[{i}] ({}): label {:?} is too long (keys at most {MAX_LABEL_KEY_LEN} bytes, values {MAX_LABEL_VALUE_LEN}; value is {} bytes)",
                    p.name,
                    k.chars().take(40).collect::<String>(),
                    v.len()
                ));
            }
        }
        Ok(())
    }

    /// The hash of a series key; the order of the labels does not matter.
    fn key_hash<'l>(&self, name: &str, labels: impl Iterator<Item = (&'l str, &'l str)>) -> u64 {
        let labels = labels.fold(0u64, |acc, kv| acc.wrapping_add(self.hasher.hash_one(kv)));
        self.hasher.hash_one((name, labels))
    }

    /// The owner's series, created empty if it has none yet.
    fn owner<'o>(owners: &'o mut HashMap<String, Owner>, owner: &str) -> &'o mut Owner {
        if !owners.contains_key(owner) {
            owners.insert(owner.to_string(), Owner::default());
        }
        owners.get_mut(owner).expect("just inserted")
    }

    /// Stores points for `owner`; a point without a timestamp is stamped `now_ms`.
    pub fn record(&self, owner: &str, points: &[MetricDataPoint], now_ms: u64) -> Recorded {
        let (retention, max_series) = *self.limits.lock();
        let mut owners = self.owners.lock();
        let o = Self::owner(&mut owners, owner);
        let mut out = Recorded::default();
        for p in points {
            let labels = p.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            let hash = self.key_hash(&p.name, labels.clone());
            match o.ring(hash, &p.name, labels, max_series) {
                Some(ring) => {
                    push_point(ring, stamp(p, now_ms), p.value, retention);
                    out.accepted += 1;
                }
                None => out.refused_new_series += 1,
            }
        }
        out
    }

    /// Stores one point per `(name, value)` for `owner`, each with the same
    /// `labels` and time: what [`SeriesStore::record`] does with the same
    /// points, without building them (the heartbeat path).
    pub fn record_values(
        &self,
        owner: &str,
        labels: &[(&str, &str)],
        values: &[(&str, f64)],
        ts_ms: u64,
    ) -> Recorded {
        let (retention, max_series) = *self.limits.lock();
        let mut owners = self.owners.lock();
        let o = Self::owner(&mut owners, owner);
        let mut out = Recorded::default();
        for (name, value) in values {
            let labels = labels.iter().copied();
            let hash = self.key_hash(name, labels.clone());
            match o.ring(hash, name, labels, max_series) {
                Some(ring) => {
                    push_point(ring, ts_ms, *value, retention);
                    out.accepted += 1;
                }
                None => out.refused_new_series += 1,
            }
        }
        out
    }

    /// Points of `owner` whose name is in `names` (empty = all), within
    /// `[start_ms, end_ms]`, ordered by name, labels, then time.
    pub fn query(
        &self,
        owner: &str,
        names: &[String],
        start_ms: u64,
        end_ms: u64,
    ) -> Vec<MetricDataPoint> {
        let owners = self.owners.lock();
        let Some(o) = owners.get(owner) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for s in matching(o, names) {
            for (ts, v) in &s.ring {
                if *ts >= start_ms && *ts <= end_ms {
                    out.push(point(&s.key, *ts, *v));
                }
            }
        }
        out
    }

    /// The latest point of each matching series of `owner`.
    pub fn latest(&self, owner: &str, names: &[String]) -> Vec<MetricDataPoint> {
        let owners = self.owners.lock();
        let Some(o) = owners.get(owner) else {
            return Vec::new();
        };
        matching(o, names)
            .into_iter()
            .filter_map(|s| s.ring.back().map(|(ts, v)| point(&s.key, *ts, *v)))
            .collect()
    }

    /// Owners with any series (module instances and `nlb`).
    pub fn owners(&self) -> Vec<String> {
        let mut v: Vec<String> = self.owners.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// Drops the series of owners for which `keep` is false (except the
    /// NLB's own); returns how many owners went.
    pub fn retain_owners(&self, keep: impl Fn(&str) -> bool) -> usize {
        let mut owners = self.owners.lock();
        let before = owners.len();
        owners.retain(|o, _| o == NLB_OWNER || keep(o));
        before - owners.len()
    }

    /// Drops an owner's series (its instance left the registry).
    pub fn remove_owner(&self, owner: &str) {
        self.owners.lock().remove(owner);
    }

    /// Total series held.
    pub fn series_count(&self) -> usize {
        self.owners.lock().values().map(|o| o.series.len()).sum()
    }
}

fn point(key: &SeriesKey, ts: u64, value: f64) -> MetricDataPoint {
    MetricDataPoint {
        name: key.name.clone(),
        value,
        labels: key
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        timestamp: Some(from_unix_millis(ts)),
    }
}

/// Aggregates points per series (name + labels) into five points each,
/// labelled `agg` = `avg`, `min`, `max`, `sum`, `count`, stamped with the
/// latest time seen. Series keep their order of first appearance.
pub fn aggregate(points: &[MetricDataPoint]) -> Vec<MetricDataPoint> {
    let mut order: Vec<SeriesKey> = Vec::new();
    let mut acc: HashMap<SeriesKey, (f64, f64, f64, u64, u64)> = HashMap::new();
    for p in points {
        let key = SeriesKey::of(p);
        let ts = stamp(p, 0);
        let e = acc.entry(key.clone()).or_insert_with(|| {
            order.push(key);
            (0.0, f64::INFINITY, f64::NEG_INFINITY, 0, 0)
        });
        e.0 += p.value;
        e.1 = e.1.min(p.value);
        e.2 = e.2.max(p.value);
        e.3 += 1;
        e.4 = e.4.max(ts);
    }
    let mut out = Vec::new();
    for key in order {
        let (sum, min, max, count, ts) = acc[&key];
        for (agg, value) in [
            ("avg", sum / count as f64),
            ("min", min),
            ("max", max),
            ("sum", sum),
            ("count", count as f64),
        ] {
            let mut p = point(&key, ts, value);
            p.labels.insert("agg".into(), agg.into());
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, v: f64, ts: u64) -> MetricDataPoint {
        MetricDataPoint {
            name: name.into(),
            value: v,
            labels: Default::default(),
            timestamp: Some(from_unix_millis(ts)),
        }
    }

    #[test]
    fn rings_keep_the_newest_points_in_time_order() {
        let s = SeriesStore::new(3, 10);
        let pts: Vec<_> = (0..5).map(|i| p("rps", i as f64, 1000 + i)).collect();
        assert_eq!(s.record("a", &pts, 0).accepted, 5);
        s.record("a", &[p("rps", 9.0, 1001)], 0); // late point lands in place, then the oldest drops
        let got: Vec<f64> = s
            .query("a", &[], 0, u64::MAX)
            .iter()
            .map(|p| p.value)
            .collect();
        // 0..4 at t=1000..1004, then 9 at t=1001: the ring keeps the three newest by time.
        assert_eq!(got, vec![2.0, 3.0, 4.0]);
    }

    #[test]
    fn series_past_the_cap_are_refused() {
        let s = SeriesStore::new(10, 2);
        let r = s.record(
            "a",
            &[
                p("a", 1.0, 1),
                p("b", 1.0, 1),
                p("c", 1.0, 1),
                p("a", 2.0, 2),
            ],
            0,
        );
        assert_eq!(
            r,
            Recorded {
                accepted: 3,
                refused_new_series: 1
            }
        );
        assert_eq!(s.series_count(), 2);
    }

    #[test]
    fn queries_filter_by_name_and_window() {
        let s = SeriesStore::new(10, 10);
        s.record(
            "a",
            &[p("x", 1.0, 100), p("x", 2.0, 200), p("y", 3.0, 150)],
            0,
        );
        let got = s.query("a", &["x".into()], 150, 250);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].value, 2.0);
        assert_eq!(s.latest("a", &[]).len(), 2);
        assert!(s.query("nobody", &[], 0, u64::MAX).is_empty());
    }

    #[test]
    fn record_values_stores_what_record_stores() {
        let with_labels = |name: &str, v: f64, ts: u64| MetricDataPoint {
            labels: [
                ("source".to_string(), "heartbeat".to_string()),
                ("zone".to_string(), "a".to_string()),
            ]
            .into(),
            ..p(name, v, ts)
        };
        let (a, b) = (SeriesStore::new(5, 10), SeriesStore::new(5, 10));
        for t in 0..8u64 {
            let v = t as f64;
            a.record(
                "i",
                &[with_labels("cpu", v, t), with_labels("mem", 2.0 * v, t)],
                0,
            );
            // Labels in another order are the same series.
            b.record_values(
                "i",
                &[("zone", "a"), ("source", "heartbeat")],
                &[("cpu", v), ("mem", 2.0 * v)],
                t,
            );
        }
        assert_eq!(
            a.query("i", &[], 0, u64::MAX),
            b.query("i", &[], 0, u64::MAX)
        );
        assert_eq!(
            b.query("i", &[], 0, u64::MAX).len(),
            10,
            "5 kept per series"
        );
        assert_eq!(b.series_count(), 2);
        // Another label set is another series, within the cap.
        let r = b.record_values("i", &[("source", "x")], &[("cpu", 1.0)], 9);
        assert_eq!(r.accepted, 1);
        assert_eq!(b.series_count(), 3);
        let capped = SeriesStore::new(5, 1);
        let r = capped.record_values("i", &[], &[("cpu", 1.0), ("mem", 1.0), ("cpu", 2.0)], 1);
        assert_eq!(
            r,
            Recorded {
                accepted: 2,
                refused_new_series: 1
            }
        );
    }

    #[test]
    fn aggregation_gives_avg_min_max_sum_count() {
        let agg = aggregate(&[p("x", 1.0, 1), p("x", 3.0, 5), p("x", 8.0, 3)]);
        let get = |a: &str| agg.iter().find(|p| p.labels["agg"] == a).unwrap().value;
        assert_eq!(get("avg"), 4.0);
        assert_eq!(get("min"), 1.0);
        assert_eq!(get("max"), 8.0);
        assert_eq!(get("sum"), 12.0);
        assert_eq!(get("count"), 3.0);
        assert_eq!(
            unix_millis(to_system(agg[0].timestamp.as_ref().unwrap())),
            5
        );
    }

    #[test]
    fn bad_points_are_named() {
        let err = SeriesStore::validate(&[p("ok", 1.0, 1), p("bad", f64::NAN, 1)]).unwrap_err();
        assert!(err.contains("metrics.metrics[1] (bad)"), "{err}");
        assert!(SeriesStore::validate(&[p("", 1.0, 1)])
            .unwrap_err()
            .contains("name"));
    }
}
