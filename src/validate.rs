//! Error metrics and tolerances for judging a kernel's output against the reference.

use std::fmt;

use half::f16;

use crate::error::Result;
use crate::inputs::AttentionInputs;
use crate::problem::AttentionProblem;

/// How far an output is from the expected one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ErrorStats {
    /// Largest `|actual - expected|` over finite expected values.
    pub max_abs: f64,
    /// Largest `|actual - expected| / |expected|` over elements with
    /// `|expected| >= REL_FLOOR · max|expected|`; near-zero expected values are left out because
    /// their relative error tells nothing about the kernel.
    pub max_rel: f64,
    /// Normalized mean squared error `Σ (a - e)² / Σ e²` (0 when both are all zero).
    pub nmse: f64,
    /// Largest `|expected|`, the magnitude that absolute errors are judged against.
    pub max_expected: f64,
    /// Flat index of the element with the largest absolute error among those where both sides
    /// are finite (0 when there is none).
    pub worst_index: usize,
    /// Elements where one side is NaN or infinite and the other is not the same non-finite value.
    pub nonfinite_mismatches: usize,
    /// Flat index of the first such element, if any.
    pub first_nonfinite_mismatch: Option<usize>,
    /// Elements compared.
    pub len: usize,
    /// Largest amount by which `|actual - expected|` exceeds its element's allowance for the f32
    /// rounding of large scores ([`ErrorStats::compare_allowing_score_rounding`]). Without
    /// allowances it equals `max_abs`. [`ErrorStats::passes`] judges this value.
    pub max_abs_excess: f64,
    /// Normalized mean squared error of those excesses, `Σ excess² / Σ e²`. Without allowances
    /// it equals `nmse`. [`ErrorStats::passes`] judges this value.
    pub nmse_excess: f64,
}

/// Relative floor for [`ErrorStats::max_rel`]: elements smaller than this fraction of the
/// largest expected magnitude are left out of the relative error.
pub const REL_FLOOR: f64 = 1e-3;

/// Relative error allowed in every term of an f32 score by
/// [`ErrorStats::compare_allowing_score_rounding`]: 8 units of f32 rounding (2⁻²⁴).
///
/// A score of `d` products summed in f32 is off by at most about `d · 2⁻²⁴` times the sum of its
/// terms' magnitudes, and by about `√d · 2⁻²⁴` times that in practice. On lavapipe (Mesa 22.3),
/// the problems of `tests/score_rounding.rs` passed [`Tolerance::F32`] in every kernel with at
/// most half a unit. They have scales of 20 to 100 at head dims 64 to 256, soft-capping, ALiBi
/// biases up to 12,000 and rows shifted by a mask of -1e4. The three-stage and tiled programs
/// needed 2 units while they summed each dot product serially over the head dim. 8 units leave
/// room for adapters that sum in another order, and still reject a scale off by 1 %.
pub const SCORE_ROUNDING: f64 = 8.0 / 16_777_216.0;

impl ErrorStats {
    /// Compares `actual` with `expected` element by element.
    ///
    /// # Panics
    ///
    /// Panics if the slices differ in length, which is a bug in the caller.
    pub fn compare<A: Into<f64> + Copy, E: Into<f64> + Copy>(actual: &[A], expected: &[E]) -> Self {
        Self::compare_with_allowance(actual, expected, |_| 0.0)
    }

    /// Compares `actual` with the reference's `expected` values as [`ErrorStats::compare`]
    /// does, and allows each element an extra error of [`SCORE_ROUNDING`] times its
    /// `score_sensitivity` (the reference's `out_score_sensitivity` or `lse_score_sensitivity`)
    /// for the f32 rounding of its row's scores. `max_abs` and `nmse` still report the whole
    /// error, and `max_abs_excess` and `nmse_excess` what lies beyond the allowances.
    ///
    /// Use it for problems whose scores can be large: explicit scales far above `1/√d`, ALiBi
    /// biases in the thousands, or masks that add one large value to every key of a row. Where
    /// scores stay small the allowances are far below [`Tolerance::F32`] and change nothing.
    ///
    /// # Panics
    ///
    /// Panics if the slices differ in length, which is a bug in the caller.
    pub fn compare_allowing_score_rounding<A: Into<f64> + Copy, E: Into<f64> + Copy>(
        actual: &[A],
        expected: &[E],
        score_sensitivity: &[f64],
    ) -> Self {
        assert_eq!(
            expected.len(),
            score_sensitivity.len(),
            "expected values and score sensitivities differ in length"
        );
        Self::compare_with_allowance(actual, expected, |index| {
            SCORE_ROUNDING * score_sensitivity[index]
        })
    }

    /// Compares `actual` with `expected` as [`ErrorStats::compare`] does, and allows element
    /// `i` an extra absolute error of `allowance(i)`, which `max_abs_excess` and `nmse_excess`
    /// leave out. [`ErrorStats::compare_allowing_score_rounding`] is this with
    /// [`SCORE_ROUNDING`] times the reference's sensitivities.
    ///
    /// # Panics
    ///
    /// Panics if the slices differ in length, which is a bug in the caller.
    pub fn compare_with_allowance<A: Into<f64> + Copy, E: Into<f64> + Copy>(
        actual: &[A],
        expected: &[E],
        allowance: impl Fn(usize) -> f64,
    ) -> Self {
        assert_eq!(
            actual.len(),
            expected.len(),
            "compared slices differ in length"
        );
        let max_expected = expected
            .iter()
            .map(|&e| e.into().abs())
            .filter(|e| e.is_finite())
            .fold(0.0f64, f64::max);
        let rel_floor = REL_FLOOR * max_expected;
        let mut stats = ErrorStats {
            max_expected,
            len: actual.len(),
            ..Default::default()
        };
        let (mut err_sq, mut excess_sq, mut ref_sq) = (0.0f64, 0.0f64, 0.0f64);
        let mut finite_seen = false;
        for (index, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            let (a, e): (f64, f64) = (a.into(), e.into());
            let excess = Self::element_excess(a, e, allowance(index));
            if !e.is_finite() || !a.is_finite() {
                if excess > 0.0 {
                    stats.nonfinite_mismatches += 1;
                    stats.first_nonfinite_mismatch.get_or_insert(index);
                }
                continue;
            }
            let diff = (a - e).abs();
            if diff > stats.max_abs || !finite_seen {
                stats.max_abs = diff;
                stats.worst_index = index;
                finite_seen = true;
            }
            if e.abs() >= rel_floor && e != 0.0 {
                stats.max_rel = stats.max_rel.max(diff / e.abs());
            }
            stats.max_abs_excess = stats.max_abs_excess.max(excess);
            err_sq += diff * diff;
            excess_sq += excess * excess;
            ref_sq += e * e;
        }
        stats.nmse = normalized(err_sq, ref_sq);
        stats.nmse_excess = normalized(excess_sq, ref_sq);
        stats
    }

    /// Returns how far `actual` is from `expected` beyond `allowance`: 0 within it, and infinity
    /// where one value is NaN or infinite and the other is not the same value (NaN matches NaN,
    /// and an infinity the same infinity). A NaN allowance allows nothing.
    pub fn element_excess(actual: f64, expected: f64, allowance: f64) -> f64 {
        if !expected.is_finite() || !actual.is_finite() {
            let same = (actual.is_nan() && expected.is_nan()) || actual == expected;
            return if same { 0.0 } else { f64::INFINITY };
        }
        let diff = (actual - expected).abs();
        if allowance.is_nan() {
            diff
        } else {
            (diff - allowance).max(0.0)
        }
    }

    /// Returns whether these errors, beyond any allowances for score rounding, are within
    /// `tolerance`.
    pub fn passes(&self, tolerance: &Tolerance) -> bool {
        self.nonfinite_mismatches == 0
            && self.max_abs_excess <= tolerance.abs_limit(self.max_expected)
            && self.nmse_excess <= tolerance.nmse
    }

    /// Returns whether allowances for score rounding removed part of the error.
    pub fn has_allowance(&self) -> bool {
        self.max_abs_excess < self.max_abs || self.nmse_excess < self.nmse
    }
}

/// Returns `squared_error / squared_reference`, 0 when both are 0 and infinity when only the
/// reference is.
fn normalized(squared_error: f64, squared_reference: f64) -> f64 {
    if squared_reference > 0.0 {
        squared_error / squared_reference
    } else if squared_error > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

impl fmt::Display for ErrorStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max_abs {:.3e} (at {}), max_rel {:.3e}, nmse {:.3e}",
            self.max_abs, self.worst_index, self.max_rel, self.nmse
        )?;
        if self.has_allowance() {
            write!(
                f,
                ", beyond score rounding max_abs {:.3e}, nmse {:.3e}",
                self.max_abs_excess, self.nmse_excess
            )?;
        }
        if let Some(first) = self.first_nonfinite_mismatch {
            write!(
                f,
                ", {} NaN/inf mismatches (the first at {first})",
                self.nonfinite_mismatches
            )?;
        }
        Ok(())
    }
}

/// Limits on [`ErrorStats`] for one precision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Largest absolute error allowed, relative to `max(1, max|expected|)`.
    pub abs: f64,
    /// Largest normalized mean squared error allowed.
    pub nmse: f64,
}

impl Tolerance {
    /// Tolerance for f32 inputs and f32 accumulation.
    ///
    /// An f32 output is a convex combination of value rows computed with f32 products and sums,
    /// so its error against the f64 reference is a few units of f32 rounding (2⁻²⁴ ≈ 6e-8)
    /// grown by the length of the sums. On lavapipe the three-stage path measured max_abs
    /// 1.5e-7 and nmse 4e-13 on values in [-1, 1] at up to 1024 keys. The limits sit about 60
    /// times above that for longer rows, while a wrong index, scale or mask moves outputs by
    /// 1e-2 or more.
    ///
    /// The limits assume scores of moderate size, as the default scale gives. An f32 score `s`
    /// is off by about `|s| · 2⁻²⁴` times the growth of its sum, and each probability takes that
    /// on as a relative error. A randomized comparison on lavapipe tried explicit scales of 5 to
    /// 100, and ALiBi biases in the thousands (top-left causal masking or padded key lengths
    /// over thousands of keys). Those problems gave max_abs 1.2e-5 to 1.6e-4 with nmse at most
    /// 1.5e-9, in the three-stage path as in the fused programs. Judge them by a bound that
    /// grows with the largest score.
    pub const F32: Tolerance = Tolerance {
        abs: 1e-5,
        nmse: 1e-10,
    };

    /// Tolerance for f16 storage with f32 arithmetic.
    ///
    /// The inputs are exact f16 values, so the error comes from rounding the output to f16
    /// (at most 2⁻¹¹ ≈ 4.9e-4 relative) on top of the f32 error. `abs = 2e-3` is 4 times that
    /// rounding at the largest output; `nmse = 5e-4` is FlashAttention's and llama.cpp's limit
    /// for half-precision attention. Tests also require the error to be at most twice that of
    /// [`naive_f16_attention`].
    pub const F16: Tolerance = Tolerance {
        abs: 2e-3,
        nmse: 5e-4,
    };

    /// Returns the absolute limit for outputs whose largest magnitude is `max_expected`.
    pub fn abs_limit(&self, max_expected: f64) -> f64 {
        self.abs * max_expected.max(1.0)
    }
}

/// Computes attention with every product, sum, exponential and division rounded to f16, as a
/// kernel with f16 accumulators would: the baseline that half-precision kernels are judged
/// against (their error should be at most twice this one's).
///
/// # Errors
///
/// The errors of [`crate::reference::attention`] for an invalid problem or slice lengths.
pub fn naive_f16_attention(
    problem: &AttentionProblem,
    inputs: &AttentionInputs<'_>,
) -> Result<Vec<f32>> {
    problem.validate()?;
    inputs.validate(problem)?;
    let s = &problem.shape;
    let (d, dv) = (s.head_dim, s.head_dim_v);
    let h16 = |x: f32| f16::from_f32(x).to_f32();
    let scale = h16(problem.scale() as f32);
    let (mask_batch_stride, mask_head_stride) = problem.mask_strides();
    let strides = problem.strides();
    let mut out = vec![0.0f32; problem.spans()[3]];
    for b in 0..s.batch {
        let sequence = inputs.sequence(problem, b);
        for h in 0..s.heads {
            let kv_head = h / s.group_size();
            let k_row =
                |j: usize| &inputs.k[strides.k.offset(b, kv_head, sequence.key_begin + j)..][..d];
            let v_row =
                |j: usize| &inputs.v[strides.v.offset(b, kv_head, sequence.key_begin + j)..][..dv];
            let sink = inputs.sinks.map(|sinks| h16(sinks[h]));
            for i in 0..sequence.rows {
                let q_row = &inputs.q[strides.q.offset(b, h, sequence.row_begin + i)..][..d];
                let mut scores = vec![f32::NEG_INFINITY; sequence.keys];
                for (j, score) in scores.iter_mut().enumerate() {
                    if !problem.allows_in(&sequence, i, j) {
                        continue;
                    }
                    let dot = q_row
                        .iter()
                        .zip(k_row(j))
                        .fold(0.0, |acc, (&a, &b)| h16(acc + h16(h16(a) * h16(b))));
                    *score = h16(problem.cap(f64::from(h16(dot * scale))) as f32);
                    if let Some(slopes) = inputs.alibi_slopes {
                        let distance = (j as i64 - sequence.diagonal(i)).abs() as f32;
                        *score = h16(*score - h16(h16(slopes[h]) * distance));
                    }
                    if let Some(mask) = inputs.mask {
                        *score = h16(*score
                            + mask
                                [b * mask_batch_stride + h * mask_head_stride + i * s.seq_kv + j]);
                    }
                }
                let max = scores
                    .iter()
                    .copied()
                    .chain(sink)
                    .fold(f32::NEG_INFINITY, f32::max);
                let row = &mut out[strides.out.offset(b, h, sequence.row_begin + i)..][..dv];
                if max != f32::NEG_INFINITY {
                    let weights: Vec<f32> = scores.iter().map(|&x| h16((x - max).exp())).collect();
                    let sink_weight = sink.map_or(0.0, |sink| h16((sink - max).exp()));
                    let sum = weights.iter().fold(sink_weight, |acc, &w| h16(acc + w));
                    for (j, &w) in weights.iter().enumerate() {
                        let p = h16(w / sum);
                        for (o, &v) in row.iter_mut().zip(v_row(j)) {
                            *o = h16(*o + h16(p * h16(v)));
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowance_removes_only_its_share() {
        // Errors of 1e-4 and 3e-4 with allowances of 2e-4 each leave excesses of 0 and 1e-4.
        let sensitivity = [2e-4 / SCORE_ROUNDING; 2];
        let stats = ErrorStats::compare_allowing_score_rounding(
            &[1.0001, 2.0003],
            &[1.0, 2.0],
            &sensitivity,
        );
        assert!((stats.max_abs - 3e-4).abs() < 1e-12, "{stats}");
        assert!((stats.max_abs_excess - 1e-4).abs() < 1e-12, "{stats}");
        assert!((stats.nmse_excess - 1e-8 / 5.0).abs() < 1e-18, "{stats}");
        assert!(stats.has_allowance());
        assert!(!stats.passes(&Tolerance::F32), "{stats}");
    }

    #[test]
    fn nan_sensitivity_allows_nothing() {
        let stats = ErrorStats::compare_allowing_score_rounding(&[1.5f32], &[1.0f64], &[f64::NAN]);
        assert_eq!(stats.max_abs_excess, 0.5);
        assert!(!stats.has_allowance());
    }

    #[test]
    fn element_excess_of_nonfinite_values() {
        assert_eq!(ErrorStats::element_excess(f64::NAN, f64::NAN, 0.0), 0.0);
        assert_eq!(
            ErrorStats::element_excess(f64::INFINITY, f64::INFINITY, 0.0),
            0.0
        );
        assert_eq!(
            ErrorStats::element_excess(1.0, f64::NAN, 1e9),
            f64::INFINITY
        );
        assert_eq!(
            ErrorStats::element_excess(f64::NEG_INFINITY, f64::INFINITY, 0.0),
            f64::INFINITY
        );
        assert_eq!(ErrorStats::element_excess(1.5, 1.0, 0.25), 0.25);
    }

    #[test]
    fn plain_compare_has_no_allowance() {
        let stats = ErrorStats::compare(&[1.5f32, 2.0], &[1.0f64, 2.0]);
        assert_eq!(stats.max_abs_excess, stats.max_abs);
        assert_eq!(stats.nmse_excess, stats.nmse);
        assert!(!stats.has_allowance());
    }
}
