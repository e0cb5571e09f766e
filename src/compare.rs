//! Error metrics between a computed tensor and a reference, as `openuni verify` reports them.

use openuni_tensor::HostTensor;

#[derive(Clone, Copy, Debug)]
pub struct Diff {
    pub max_abs: f64,
    /// ‖got − expected‖₂ / ‖expected‖₂ (the absolute L2 error when the reference is all zeros).
    pub rel_l2: f64,
    /// Non-finite values in `got` (a NaN never passes).
    pub non_finite: usize,
    /// Fraction of values off by more than 0.5 (for integer-valued outputs such as pixels).
    pub frac_over_half: f64,
}

/// Metrics of `got` against `expected`. A non-finite value on either side makes `max_abs` and
/// `rel_l2` non-finite (NaN is propagated, never dropped the way `f64::max` drops it), so such an
/// output can never pass; callers refuse non-finite references before comparing.
pub fn diff(got: &HostTensor, expected: &HostTensor) -> Diff {
    let (g, e) = (got.to_f32_vec(), expected.to_f32_vec());
    let (mut num, mut den, mut max_abs, mut non_finite, mut over_half) =
        (0f64, 0f64, 0f64, 0usize, 0usize);
    for (&a, &b) in g.iter().zip(&e) {
        if !a.is_finite() {
            non_finite += 1;
        }
        let d = (a as f64 - b as f64).abs();
        max_abs = nan_max(max_abs, d);
        if !(d <= 0.5) {
            over_half += 1;
        }
        num += d * d;
        den += (b as f64) * (b as f64);
    }
    let rel_l2 = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    Diff {
        max_abs,
        rel_l2,
        non_finite,
        frac_over_half: over_half as f64 / g.len().max(1) as f64,
    }
}

/// The larger of two values, NaN if either is NaN.
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// The first non-finite value of a tensor (index and value), if any.
pub fn first_non_finite(t: &HostTensor) -> Option<(usize, f32)> {
    t.to_f32_vec()
        .into_iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
}

impl Diff {
    pub fn passes(&self, tol: f64) -> bool {
        // `<=` is false for NaN: a NaN metric fails.
        self.non_finite == 0 && self.max_abs.is_finite() && self.rel_l2 <= tol
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics() {
        let e = HostTensor::from_f32([4], vec![3.0, 0.0, 4.0, 0.0]).unwrap();
        let g = HostTensor::from_f32([4], vec![3.0, 0.5, 4.0, 0.0]).unwrap();
        let d = diff(&g, &e);
        assert!((d.rel_l2 - 0.1).abs() < 1e-12);
        assert_eq!(d.max_abs, 0.5);
        assert!(d.passes(0.1) && !d.passes(0.09));
        let nan = HostTensor::from_f32([4], vec![3.0, f32::NAN, 4.0, 0.0]).unwrap();
        let d = diff(&nan, &e);
        assert!(!d.passes(1.0));
        assert!(
            d.max_abs.is_nan() && d.rel_l2.is_nan(),
            "NaN must not be dropped: {d:?}"
        );
        // A NaN or Inf in the reference makes the metrics non-finite too (never a PASS).
        let d = diff(&e, &nan);
        assert!(d.rel_l2.is_nan() && !d.passes(1.0), "{d:?}");
        let inf = HostTensor::from_f32([4], vec![3.0, f32::INFINITY, 4.0, 0.0]).unwrap();
        assert!(!diff(&e, &inf).passes(1.0));
        assert!(!diff(&inf, &inf).passes(1.0));
        assert_eq!(first_non_finite(&inf), Some((1, f32::INFINITY)));
        assert_eq!(first_non_finite(&e), None);
    }
}
