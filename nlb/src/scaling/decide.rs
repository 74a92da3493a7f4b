//! Autoscaling decisions, free of I/O: what a module type's instances carry
//! against the policy's targets, and whether to change their number now.
//!
//! - **Recommendation**: for each target in use, the count that brings the
//!   average to the target (`ceil(total / target)`); the largest of those
//!   whose metric is outside the tolerance, else the current count; within
//!   `min_instances..=max_instances`.
//! - **Up** at once to the latest recommendation, unless a change happened
//!   within `scale_up_cooldown_seconds`.
//! - **Down** to the highest recommendation over `window_seconds`, once the
//!   window is full and no change happened within
//!   `scale_down_cooldown_seconds`: a dip does not remove what a peak needs.
//! - Below `min_instances`: up to it at once, cooldown or not.

use std::collections::VecDeque;

use crate::config::TypeScaling;

/// What a type's instances carry now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Instances taking traffic.
    pub instances: u32,
    /// Instances present (not draining), starting or unhealthy ones too:
    /// what a met target holds.
    pub present: u32,
    /// Their active connections, together.
    pub connections: f64,
    /// Their average CPU percent, if any reported one.
    pub cpu_percent: Option<f64>,
}

/// The count to aim at, and why.
pub fn recommend(p: &TypeScaling, o: &Observation) -> (u32, String) {
    let n = o.instances;
    let held = o.present.max(n);
    // (ask, why, outside its tolerance) per target in use. A target within
    // its tolerance asks for the current count, so a met target never lets
    // another shrink the type below what it needs (which would flap).
    let mut asks: Vec<(u32, String, bool)> = Vec::new();
    if p.target_connections > 0 {
        let target = f64::from(p.target_connections);
        let per = o.connections / f64::from(n.max(1));
        let outside = n == 0 || (per / target - 1.0).abs() > p.tolerance;
        let desired = (o.connections / target).ceil() as u32;
        asks.push((
            if outside { desired } else { held },
            format!(
                "{per:.1} connections per instance against a target of {}",
                p.target_connections
            ),
            outside,
        ));
    }
    if let (true, Some(cpu)) = (p.target_cpu_percent > 0, o.cpu_percent) {
        let target = f64::from(p.target_cpu_percent);
        let outside = (cpu / target - 1.0).abs() > p.tolerance;
        let desired = (f64::from(n) * cpu / target).ceil() as u32;
        asks.push((
            if outside { desired } else { held },
            format!(
                "CPU {cpu:.0}% against a target of {}%",
                p.target_cpu_percent
            ),
            outside,
        ));
    }
    // The largest ask; on a tie, one outside its tolerance names the reason.
    let best = asks
        .iter()
        .max_by_key(|(ask, _, outside)| (*ask, *outside))
        .cloned();
    let (desired, why) = match best {
        None => (held, "no metric to judge by".to_string()),
        Some((ask, why, true)) => (ask, why),
        Some((ask, _, false)) => {
            let all: Vec<&str> = asks.iter().map(|(_, w, _)| w.as_str()).collect();
            (ask, format!("within tolerance: {}", all.join("; ")))
        }
    };
    (desired.clamp(p.min_instances, p.max_instances), why)
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Hold,
    /// Scale to this many, and why.
    Scale(u32, String),
}

/// One type's memory between evaluations.
#[derive(Debug, Default)]
pub struct TypeState {
    /// (ms, recommended count), oldest first.
    recommendations: VecDeque<(u64, u32)>,
    /// When the window began (the first evaluation, or the last change).
    since_ms: Option<u64>,
    last_change_ms: Option<u64>,
}

impl TypeState {
    /// Records this evaluation's recommendation and decides.
    pub fn decide(
        &mut self,
        p: &TypeScaling,
        now_ms: u64,
        current: u32,
        recommended: u32,
        why: &str,
    ) -> Decision {
        let window_ms = p.window_seconds * 1000;
        self.recommendations.push_back((now_ms, recommended));
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| now_ms.saturating_sub(*t) > window_ms)
        {
            self.recommendations.pop_front();
        }
        let since = *self.since_ms.get_or_insert(now_ms);
        let quiet_for = |cooldown_s: u64| {
            self.last_change_ms
                .is_none_or(|t| now_ms.saturating_sub(t) >= cooldown_s * 1000)
        };
        if current < p.min_instances {
            return Decision::Scale(
                p.min_instances,
                format!("{current} instances, below the minimum {}", p.min_instances),
            );
        }
        if current > p.max_instances {
            return Decision::Scale(
                p.max_instances,
                format!("{current} instances, above the maximum {}", p.max_instances),
            );
        }
        if recommended > current && quiet_for(p.scale_up_cooldown_seconds) {
            return Decision::Scale(recommended, why.to_string());
        }
        let peak = self
            .recommendations
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(recommended);
        let window_full = now_ms.saturating_sub(since) >= window_ms;
        if peak < current && window_full && quiet_for(p.scale_down_cooldown_seconds) {
            return Decision::Scale(
                peak,
                format!(
                    "{why}; the highest need over the last {} s is {peak}",
                    p.window_seconds
                ),
            );
        }
        Decision::Hold
    }

    /// A change was made (or asked for): cooldowns and the window start now.
    pub fn changed(&mut self, now_ms: u64) {
        self.last_change_ms = Some(now_ms);
        self.since_ms = Some(now_ms);
        self.recommendations.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> TypeScaling {
        TypeScaling {
            min_instances: 1,
            max_instances: 6,
            target_connections: 100,
            tolerance: 0.1,
            scale_up_cooldown_seconds: 30,
            scale_down_cooldown_seconds: 60,
            window_seconds: 60,
            ..TypeScaling::default()
        }
    }

    fn obs(instances: u32, connections: f64) -> Observation {
        Observation {
            instances,
            present: instances,
            connections,
            cpu_percent: None,
        }
    }

    #[test]
    fn recommendations_aim_at_the_target_within_bounds() {
        let p = policy();
        assert_eq!(recommend(&p, &obs(2, 450.0)).0, 5);
        assert_eq!(recommend(&p, &obs(2, 2000.0)).0, 6, "capped at the maximum");
        assert_eq!(recommend(&p, &obs(3, 20.0)).0, 1);
        // 105 per instance is within 10% of 100: stay.
        let (n, why) = recommend(&p, &obs(2, 210.0));
        assert_eq!(n, 2);
        assert!(why.starts_with("within tolerance"), "{why}");
        // CPU as well: the larger need wins.
        let p = TypeScaling {
            target_cpu_percent: 50,
            ..policy()
        };
        let o = Observation {
            instances: 2,
            present: 2,
            connections: 100.0,
            cpu_percent: Some(90.0),
        };
        let (n, why) = recommend(&p, &o);
        assert_eq!(n, 4, "{why}");
        assert!(why.contains("CPU 90%"), "{why}");
        // A met target holds the count against another's lower ask: 400
        // connections on 4 instances is on target, 10% CPU alone would ask
        // for 1 (then, on one instance, for 4 again: flapping).
        let o = Observation {
            instances: 4,
            present: 4,
            connections: 400.0,
            cpu_percent: Some(10.0),
        };
        let p = TypeScaling {
            target_cpu_percent: 50,
            ..policy()
        };
        let (n, why) = recommend(&p, &o);
        assert_eq!(n, 4, "{why}");
        assert!(why.starts_with("within tolerance"), "{why}");
        // A met target holds every instance present, one still starting
        // (or unhealthy) too: it is not scaled away.
        let o = Observation {
            instances: 2,
            present: 3,
            connections: 210.0,
            cpu_percent: None,
        };
        let (n, why) = recommend(&policy(), &o);
        assert_eq!(n, 3, "{why}");
    }

    #[test]
    fn up_at_once_down_only_after_a_full_quiet_window() {
        let p = policy();
        let mut s = TypeState::default();
        assert_eq!(s.decide(&p, 0, 2, 2, "steady"), Decision::Hold);
        // Load rises: up at once.
        assert_eq!(
            s.decide(&p, 15_000, 2, 5, "busy"),
            Decision::Scale(5, "busy".into())
        );
        s.changed(15_000);
        // More load within the up cooldown: wait.
        assert_eq!(s.decide(&p, 30_000, 5, 6, "busier"), Decision::Hold);
        assert!(matches!(
            s.decide(&p, 45_000, 5, 6, "busier"),
            Decision::Scale(6, _)
        ));
        s.changed(45_000);
        // Load falls: nothing until the window since the change is full
        // and the peak in it is lower.
        for t in (60_000..105_000).step_by(15_000) {
            assert_eq!(s.decide(&p, t, 6, 2, "quiet"), Decision::Hold, "at {t}");
        }
        match s.decide(&p, 105_000, 6, 2, "quiet") {
            Decision::Scale(2, why) => assert!(
                why.contains("highest need over the last 60 s is 2"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_dip_inside_the_window_does_not_scale_down() {
        let p = policy();
        let mut s = TypeState::default();
        s.decide(&p, 0, 4, 4, "");
        s.decide(&p, 30_000, 4, 4, "");
        // One quiet evaluation after a full window: the peak in the window
        // is still 4.
        assert_eq!(s.decide(&p, 60_000, 4, 1, ""), Decision::Hold);
        assert_eq!(s.decide(&p, 90_000, 4, 1, ""), Decision::Hold);
        // Once the busy ones have left the window, it goes down.
        assert!(matches!(
            s.decide(&p, 125_000, 4, 1, ""),
            Decision::Scale(1, _)
        ));
    }

    #[test]
    fn bounds_are_restored_at_once() {
        let p = policy();
        let mut s = TypeState::default();
        s.changed(0);
        assert!(
            matches!(s.decide(&p, 1, 0, 1, ""), Decision::Scale(1, ref w) if w.contains("below the minimum"))
        );
        assert!(
            matches!(s.decide(&p, 2, 9, 6, ""), Decision::Scale(6, ref w) if w.contains("above the maximum"))
        );
    }
}
