//! Version and traffic-weight state: one consistent record that
//! `SetTrafficWeight`, `PromoteVersion`, `Rollback`, `GetActiveVersion` and
//! `GetStatus` all read and change.
//!
//! - The *active* version is the stable one (blue); it starts as the version
//!   this instance runs.
//! - Weights are percentages per version and always sum to 100. Setting one
//!   version's weight gives the rest to the others in proportion to their
//!   weights (all of it to the active version when the others have none).
//!   A version other than the active one with a weight is the candidate
//!   (green); with a weight strictly between 0 and 100 it is a canary.
//! - `PromoteVersion` with `immediate` makes the version active at 100 %;
//!   without, it moves the version's weight up by `promotion_rate` points
//!   (default 10) per call, and the version becomes active when it reaches
//!   100. The NLB's rollout controller paces the calls.
//! - `Rollback` makes the target (default: the previously active version)
//!   active at 100 %.

use std::collections::BTreeMap;
use std::time::SystemTime;

use shared_types::pb::BlueGreenConfig;

/// Default `promotion_rate` (percentage points per `PromoteVersion` call).
pub const DEFAULT_PROMOTION_RATE: i32 = 10;
/// Most versions remembered.
pub const MAX_VERSIONS: usize = 16;

/// Why a version change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NoPrevious(String),
}

#[derive(Debug, Clone)]
pub struct Versions {
    /// The version this instance runs.
    own: String,
    active: String,
    /// Earlier active versions, most recent last.
    history: Vec<String>,
    weights: BTreeMap<String, i32>,
    deployment_started: Option<SystemTime>,
}

/// What a promotion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    pub version: String,
    pub weight: i32,
    /// The version is now the active one.
    pub completed: bool,
}

impl Versions {
    pub fn new(own: &str) -> Self {
        Versions {
            own: own.to_string(),
            active: own.to_string(),
            history: Vec::new(),
            weights: BTreeMap::from([(own.to_string(), 100)]),
            deployment_started: None,
        }
    }

    pub fn own(&self) -> &str {
        &self.own
    }

    pub fn active(&self) -> &str {
        &self.active
    }

    /// Weight per version (every known version, summing to 100).
    pub fn weights(&self) -> &BTreeMap<String, i32> {
        &self.weights
    }

    /// The weight of the version this instance runs.
    pub fn own_weight(&self) -> i32 {
        self.weights.get(&self.own).copied().unwrap_or(0)
    }

    /// The candidate (green): the heaviest version other than the active one.
    fn candidate(&self) -> Option<(&String, i32)> {
        self.weights
            .iter()
            .filter(|(v, _)| **v != self.active)
            .max_by_key(|(v, w)| (**w, std::cmp::Reverse((*v).clone())))
            .map(|(v, w)| (v, *w))
    }

    /// The state as the contract's `BlueGreenConfig`.
    pub fn blue_green(&self) -> BlueGreenConfig {
        let blue_weight = self.weights.get(&self.active).copied().unwrap_or(0);
        let (green, green_weight) = self
            .candidate()
            .map(|(v, w)| (v.clone(), w))
            .unwrap_or_default();
        BlueGreenConfig {
            blue_version: self.active.clone(),
            green_version: green,
            blue_weight,
            green_weight,
            active_version: self.active.clone(),
            canary_enabled: green_weight > 0 && green_weight < 100,
            canary_percent: green_weight,
            deployment_started: self.deployment_started.map(shared_types::time::from_system),
        }
    }

    /// `SetTrafficWeight`: `version` gets `weight` %, the others share the
    /// rest in proportion.
    pub fn set_weight(&mut self, version: &str, weight: i32) -> Result<(), VersionError> {
        check_version(version)?;
        if !(0..=100).contains(&weight) {
            return Err(VersionError::Invalid(format!(
                "weight {weight} for version {version:?} is outside 0-100"
            )));
        }
        if !self.weights.contains_key(version) && self.weights.len() >= MAX_VERSIONS {
            return Err(VersionError::Invalid(format!(
                "version {version:?} would be version {} of at most {MAX_VERSIONS}; roll back or promote first",
                MAX_VERSIONS + 1
            )));
        }
        if version != self.active && self.weights.get(version).copied().unwrap_or(0) == 0 {
            self.deployment_started = Some(SystemTime::now());
        }
        self.weights.insert(version.to_string(), weight);
        self.spread_rest(version);
        Ok(())
    }

    /// Gives `100 - weights[fixed]` to the other versions in proportion to
    /// their weights (to the active one when they have none), so the total
    /// is exactly 100.
    fn spread_rest(&mut self, fixed: &str) {
        let rest = 100 - self.weights[fixed];
        let others: Vec<(String, i32)> = self
            .weights
            .iter()
            .filter(|(v, _)| *v != fixed)
            .map(|(v, w)| (v.clone(), *w))
            .collect();
        let total: i32 = others.iter().map(|(_, w)| w).sum();
        if total == 0 {
            for (v, _) in &others {
                self.weights.insert(v.clone(), 0);
            }
            if fixed != self.active {
                self.weights.insert(self.active.clone(), rest);
            } else if let Some((v, _)) = others.first() {
                // The active version took less than 100: the rest goes to
                // a known candidate.
                self.weights.insert(v.clone(), rest);
            } else if rest > 0 {
                // Nobody else to give it to: the active version keeps all.
                self.weights.insert(fixed.to_string(), 100);
            }
            return;
        }
        let mut given = 0;
        let mut shares: Vec<(String, i32, i32)> = others
            .iter()
            .map(|(v, w)| {
                let exact = rest * w;
                let share = exact / total;
                given += share;
                (v.clone(), share, exact % total)
            })
            .collect();
        // Largest remainders first, then by name, take the leftover points.
        shares.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        let mut left = rest - given;
        for (v, share, _) in &shares {
            let extra = i32::from(left > 0);
            left -= extra;
            self.weights.insert(v.clone(), share + extra);
        }
    }

    /// `PromoteVersion`.
    pub fn promote(
        &mut self,
        version: &str,
        immediate: bool,
        rate: i32,
    ) -> Result<Promotion, VersionError> {
        check_version(version)?;
        if !(0..=100).contains(&rate) {
            return Err(VersionError::Invalid(format!(
                "promotion_rate {rate} is outside 0-100 (0 = {DEFAULT_PROMOTION_RATE})"
            )));
        }
        if version == self.active {
            self.set_weight(version, 100)?;
            return Ok(Promotion {
                version: version.into(),
                weight: 100,
                completed: true,
            });
        }
        let step = if rate == 0 {
            DEFAULT_PROMOTION_RATE
        } else {
            rate
        };
        let now = self.weights.get(version).copied().unwrap_or(0);
        let weight = if immediate {
            100
        } else {
            (now + step).min(100)
        };
        self.set_weight(version, weight)?;
        let completed = weight == 100;
        if completed {
            self.make_active(version);
        }
        Ok(Promotion {
            version: version.into(),
            weight,
            completed,
        })
    }

    /// `Rollback`: returns (previous active, new active).
    pub fn rollback(&mut self, target: &str) -> Result<(String, String), VersionError> {
        let previous = self.active.clone();
        let target = if target.is_empty() {
            match self.history.last() {
                Some(v) => v.clone(),
                None if self.weights.len() > 1 => previous.clone(),
                None => {
                    return Err(VersionError::NoPrevious(format!(
                        "no earlier version to roll back to: {previous} has always been the only one; name target_version"
                    )))
                }
            }
        } else {
            check_version(target)?;
            target.to_string()
        };
        self.set_weight(&target, 100)?;
        if target != self.active {
            self.make_active(&target);
            // A rollback is not a step forward: do not come back to it.
            self.history.retain(|v| *v != previous && *v != target);
        }
        self.weights.retain(|_, w| *w > 0);
        self.deployment_started = None;
        Ok((previous, target))
    }

    fn make_active(&mut self, version: &str) {
        if self.active != version {
            let old = std::mem::replace(&mut self.active, version.to_string());
            self.history.retain(|v| *v != old && *v != version);
            self.history.push(old);
            if self.history.len() > MAX_VERSIONS {
                self.history.remove(0);
            }
        }
        self.weights.retain(|_, w| *w > 0);
        self.deployment_started = None;
    }
}

fn check_version(v: &str) -> Result<(), VersionError> {
    let ok = (1..=128).contains(&v.len())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '+'));
    if ok {
        Ok(())
    } else {
        Err(VersionError::Invalid(format!(
            "version {v:?}: use 1-128 letters, digits, '-', '_', '.', ':' or '+'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(v: &Versions) -> Vec<(String, i32)> {
        v.weights().iter().map(|(k, w)| (k.clone(), *w)).collect()
    }

    fn pairs(p: &[(&str, i32)]) -> Vec<(String, i32)> {
        p.iter().map(|(k, w)| (k.to_string(), *w)).collect()
    }

    #[test]
    fn starts_with_its_own_version_active_at_100() {
        let v = Versions::new("1.0");
        assert_eq!(v.active(), "1.0");
        assert_eq!(v.own_weight(), 100);
        let bg = v.blue_green();
        assert_eq!((bg.blue_version.as_str(), bg.blue_weight), ("1.0", 100));
        assert_eq!((bg.green_version.as_str(), bg.green_weight), ("", 0));
        assert!(!bg.canary_enabled);
    }

    #[test]
    fn a_canary_weight_takes_from_the_active_version() {
        let mut v = Versions::new("1.0");
        v.set_weight("2.0", 10).unwrap();
        assert_eq!(w(&v), pairs(&[("1.0", 90), ("2.0", 10)]));
        let bg = v.blue_green();
        assert_eq!(bg.green_version, "2.0");
        assert!(bg.canary_enabled);
        assert_eq!(bg.canary_percent, 10);
        assert!(bg.deployment_started.is_some());
        // The NLB tells the active version its share: the canary gets the rest.
        v.set_weight("1.0", 70).unwrap();
        assert_eq!(w(&v), pairs(&[("1.0", 70), ("2.0", 30)]));
    }

    #[test]
    fn three_versions_share_the_rest_in_proportion_and_sum_to_100() {
        let mut v = Versions::new("a");
        v.set_weight("b", 20).unwrap();
        v.set_weight("c", 10).unwrap();
        assert_eq!(v.weights().values().sum::<i32>(), 100);
        assert_eq!(w(&v), pairs(&[("a", 72), ("b", 18), ("c", 10)]));
        v.set_weight("a", 0).unwrap();
        assert_eq!(w(&v), pairs(&[("a", 0), ("b", 64), ("c", 36)]));
    }

    #[test]
    fn stepwise_promotion_completes_at_100_and_remembers_the_old_version() {
        let mut v = Versions::new("1.0");
        let p = v.promote("2.0", false, 40).unwrap();
        assert_eq!((p.weight, p.completed), (40, false));
        assert_eq!(v.active(), "1.0");
        v.promote("2.0", false, 40).unwrap();
        let p = v.promote("2.0", false, 40).unwrap();
        assert_eq!((p.weight, p.completed), (100, true));
        assert_eq!(v.active(), "2.0");
        assert_eq!(w(&v), pairs(&[("2.0", 100)]));
        assert_eq!(v.own_weight(), 0);
        let (prev, now) = v.rollback("").unwrap();
        assert_eq!((prev.as_str(), now.as_str()), ("2.0", "1.0"));
        assert_eq!(w(&v), pairs(&[("1.0", 100)]));
    }

    #[test]
    fn immediate_promotion_and_default_rate() {
        let mut v = Versions::new("1.0");
        assert_eq!(v.promote("2.0", false, 0).unwrap().weight, 10);
        let p = v.promote("2.0", true, 0).unwrap();
        assert!(p.completed);
        assert_eq!(v.active(), "2.0");
    }

    #[test]
    fn rollback_of_a_canary_returns_all_traffic_to_the_active_version() {
        let mut v = Versions::new("1.0");
        v.set_weight("2.0", 25).unwrap();
        let (prev, now) = v.rollback("").unwrap();
        assert_eq!((prev.as_str(), now.as_str()), ("1.0", "1.0"));
        assert_eq!(w(&v), pairs(&[("1.0", 100)]));
        assert!(!v.blue_green().canary_enabled);
    }

    #[test]
    fn rollback_without_history_names_what_is_missing() {
        let mut v = Versions::new("1.0");
        let e = v.rollback("").unwrap_err();
        assert!(e.to_string().contains("target_version"), "{e}");
        // An explicit target works.
        v.rollback("0.9").unwrap();
        assert_eq!(v.active(), "0.9");
    }

    #[test]
    fn bad_input_is_refused_and_changes_nothing() {
        let mut v = Versions::new("1.0");
        assert!(v.set_weight("2.0", 101).is_err());
        assert!(v.set_weight("2.0", -1).is_err());
        assert!(v.set_weight("", 5).is_err());
        assert!(v.set_weight("bad version", 5).is_err());
        assert!(v.promote("2.0", false, 200).is_err());
        assert_eq!(w(&v), pairs(&[("1.0", 100)]));
    }
}
