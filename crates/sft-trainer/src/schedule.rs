//! Learning-rate schedules, as transformers' `get_scheduler` computes them.

use serde::{Deserialize, Serialize};

/// Schedule type (HF names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Constant; like HF's `constant`, it has no warmup even if one is configured.
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
    /// Linear warmup, then linear decay to 0.
    Linear,
    /// Linear warmup, then half-cosine decay to 0.
    Cosine,
}

impl std::str::FromStr for ScheduleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "constant" => Ok(ScheduleKind::Constant),
            "constant_with_warmup" => Ok(ScheduleKind::ConstantWithWarmup),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            other => Err(format!(
                "unknown schedule `{other}`; expected constant, constant_with_warmup, linear or cosine"
            )),
        }
    }
}

/// A schedule resolved for one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Kind.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup optimizer steps.
    pub warmup_steps: u64,
    /// Total optimizer steps.
    pub total_steps: u64,
}

impl Schedule {
    /// Warmup steps as HF resolves them: explicit steps win, else `ceil(total * ratio)`.
    pub fn warmup_from(total_steps: u64, warmup_steps: u64, warmup_ratio: f64) -> u64 {
        if warmup_steps > 0 {
            warmup_steps
        } else {
            (total_steps as f64 * warmup_ratio).ceil() as u64
        }
    }

    /// The learning rate used by optimizer step `step` (0-based), as HF's `LambdaLR`.
    pub fn lr_at(&self, step: u64) -> f64 {
        let w = self.warmup_steps;
        let s = step as f64;
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            _ if step < w => s / (w.max(1) as f64),
            ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear => ((self.total_steps.saturating_sub(step)) as f64
                / (self.total_steps.saturating_sub(w).max(1)) as f64)
                .max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w as f64) / (self.total_steps.saturating_sub(w).max(1) as f64);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_shapes() {
        let s = |kind| Schedule {
            kind,
            lr: 1.0,
            warmup_steps: 2,
            total_steps: 10,
        };
        assert_eq!(s(ScheduleKind::Constant).lr_at(0), 1.0);
        assert_eq!(s(ScheduleKind::ConstantWithWarmup).lr_at(0), 0.0);
        assert_eq!(s(ScheduleKind::ConstantWithWarmup).lr_at(1), 0.5);
        assert_eq!(s(ScheduleKind::Linear).lr_at(2), 1.0);
        assert_eq!(s(ScheduleKind::Linear).lr_at(6), 0.5);
        assert!((s(ScheduleKind::Cosine).lr_at(6) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::warmup_from(100, 0, 0.03), 3);
    }
}
