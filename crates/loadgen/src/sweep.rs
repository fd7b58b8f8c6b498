//! The saturation sweep: open-loop steps at rising rates (each `factor` times the last) until
//! goodput stops rising: it falls below 95 % of the best so far, or twice in a row gains less
//! than 5 % on it. The saturation point is the rate whose step had the best goodput.

use std::sync::Arc;

use serde::Serialize;

use crate::driver::{run, Load, Mode, Until};
use crate::report::{Report, Slo};
use crate::{Client, LoadError, Workload};

/// How a sweep rises.
#[derive(Debug, Clone, Copy)]
pub struct SweepPlan {
    pub start_rate: f64,
    pub factor: f64,
    pub max_steps: usize,
    pub requests_per_step: usize,
    pub slo: Slo,
}

/// One rate's result.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub rate: f64,
    pub report: Report,
}

/// All steps, and the saturation point.
#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    pub steps: Vec<Step>,
    pub saturation_rate: f64,
    pub saturation_goodput: f64,
}

/// Whether a sweep that has seen `goodputs` should stop.
fn stops(goodputs: &[f64]) -> bool {
    let Some((&last, before)) = goodputs.split_last() else { return false };
    let best_before = before.iter().copied().fold(0.0, f64::max);
    if before.is_empty() {
        return false;
    }
    if last < 0.95 * best_before {
        return true;
    }
    let flat = |i: usize| {
        let best = goodputs[..i].iter().copied().fold(0.0, f64::max);
        goodputs[i] <= 1.05 * best
    };
    let n = goodputs.len();
    n >= 3 && flat(n - 1) && flat(n - 2)
}

/// Runs the sweep; `each` sees every step as it ends.
pub async fn sweep(
    client: &Client,
    workload: Arc<Workload>,
    base: &Load,
    plan: &SweepPlan,
    mut each: impl FnMut(&Step),
) -> Result<Sweep, LoadError> {
    if !(plan.start_rate > 0.0 && plan.factor > 1.0 && plan.max_steps > 0) {
        return Err(LoadError::Load(
            "a sweep needs a start rate > 0, a factor > 1 and steps > 0".into(),
        ));
    }
    let max_in_flight = match base.mode {
        Mode::Open { max_in_flight, .. } => max_in_flight,
        Mode::Closed { .. } => None,
    };
    let mut steps: Vec<Step> = Vec::new();
    let mut rate = plan.start_rate;
    for n in 0..plan.max_steps {
        let load = Load {
            mode: Mode::Open { rate, max_in_flight },
            until: Until::Requests(plan.requests_per_step),
            first_index: base.first_index + n * plan.requests_per_step,
            warmup: if n == 0 { base.warmup } else { 0 },
            seed: base.seed.wrapping_add(n as u64),
            ..base.clone()
        };
        let r = run(client, workload.clone(), &load).await?;
        let step = Step { rate, report: Report::new(&r.outcomes, r.duration, plan.slo) };
        each(&step);
        steps.push(step);
        if stops(&steps.iter().map(|s| s.report.goodput).collect::<Vec<_>>()) {
            break;
        }
        rate *= plan.factor;
    }
    let best = steps
        .iter()
        .max_by(|a, b| a.report.goodput.total_cmp(&b.report.goodput))
        .map(|s| (s.rate, s.report.goodput))
        .unwrap_or_default();
    Ok(Sweep { steps, saturation_rate: best.0, saturation_goodput: best.1 })
}

#[cfg(test)]
mod tests {
    use super::stops;

    #[test]
    fn a_sweep_stops_when_goodput_falls_or_stays_flat() {
        assert!(!stops(&[1.0]));
        assert!(!stops(&[1.0, 2.0, 3.0, 4.5]));
        assert!(stops(&[1.0, 2.0, 1.8]), "a fall of 10 %");
        assert!(!stops(&[1.0, 2.0, 2.04]), "flat once");
        assert!(stops(&[1.0, 2.0, 2.04, 2.06]), "flat twice");
        assert!(!stops(&[1.0, 2.0, 2.04, 2.5]), "rising again");
        assert!(stops(&[0.0, 0.0, 0.0]), "no goodput at all is flat");
    }
}
