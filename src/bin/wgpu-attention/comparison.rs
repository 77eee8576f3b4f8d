//! One comparison of `check`: error statistics judged by a tolerance, with where the errors sit.

use std::fmt::Write as _;

use serde_json::json;
use wgpu_attention::validate::{ErrorStats, SCORE_ROUNDING, Tolerance};

/// How many of the compared values may be off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sides {
    /// A result against the exact f64 reference: the tolerance applies as it is.
    OneApproximate,
    /// Two results that may each be off by the tolerance from the exact one, such as a kernel's
    /// output against a file's f32 output: twice the absolute limit and score-rounding
    /// allowance, and four times the nmse limit.
    BothApproximate,
}

/// An element's place in the compared tensor, and its two values.
pub(crate) struct Worst {
    /// Indices into the compared tensor, outermost first.
    pub(crate) index: Vec<usize>,
    pub(crate) actual: f64,
    pub(crate) expected: f64,
}

/// A result compared with an expected one.
pub(crate) struct Comparison {
    pub(crate) stats: ErrorStats,
    /// The limits the comparison is judged by.
    pub(crate) tolerance: Tolerance,
    /// The largest absolute error's place among elements finite on both sides, or `None` when
    /// there is no such element.
    pub(crate) worst: Option<Worst>,
    /// The first element where one side is NaN or infinite and the other differs, which the
    /// largest error leaves out.
    pub(crate) first_nonfinite: Option<Worst>,
    /// Elements whose error is over the absolute limit, counted per `(batch, head)`, in order.
    pub(crate) over_limit_by_head: Vec<((usize, usize), usize)>,
    /// Whether errors are judged beyond an allowance for the f32 rounding of large scores.
    pub(crate) score_rounding: bool,
}

impl Comparison {
    /// Compares `actual` with `expected`, two tensors of shape `dims` whose first two dimensions
    /// are batch and head, allowing each element `SCORE_ROUNDING` times its score sensitivity
    /// (once per approximate side) where `sensitivity` is given.
    pub(crate) fn new<A: Into<f64> + Copy, E: Into<f64> + Copy>(
        actual: &[A],
        expected: &[E],
        sensitivity: Option<&[f64]>,
        dims: &[usize],
        tolerance: Tolerance,
        sides: Sides,
    ) -> Self {
        let (tolerance, factor) = match sides {
            Sides::OneApproximate => (tolerance, 1.0),
            Sides::BothApproximate => (
                Tolerance {
                    abs: 2.0 * tolerance.abs,
                    nmse: 4.0 * tolerance.nmse,
                },
                2.0,
            ),
        };
        let allowance =
            |index: usize| sensitivity.map_or(0.0, |s| factor * SCORE_ROUNDING * s[index]);
        let stats = ErrorStats::compare_with_allowance(actual, expected, allowance);
        let element = |index: usize| Worst {
            index: unravel(index, dims),
            actual: actual[index].into(),
            expected: expected[index].into(),
        };
        let worst = (stats.len > 0)
            .then(|| element(stats.worst_index))
            .filter(|worst| worst.actual.is_finite() && worst.expected.is_finite());
        let first_nonfinite = stats.first_nonfinite_mismatch.map(element);
        let limit = tolerance.abs_limit(stats.max_expected);
        let head_len: usize = dims[2..].iter().product();
        let mut over_limit_by_head: Vec<((usize, usize), usize)> = Vec::new();
        for (index, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            if ErrorStats::element_excess(a.into(), e.into(), allowance(index)) <= limit {
                continue;
            }
            let head = ((index / head_len) / dims[1], (index / head_len) % dims[1]);
            match over_limit_by_head.last_mut() {
                Some((last, count)) if *last == head => *count += 1,
                _ => over_limit_by_head.push((head, 1)),
            }
        }
        Comparison {
            stats,
            tolerance,
            worst,
            first_nonfinite,
            over_limit_by_head,
            score_rounding: sensitivity.is_some(),
        }
    }

    pub(crate) fn passes(&self) -> bool {
        self.stats.passes(&self.tolerance)
    }

    /// Describes the limits and where the errors sit, for a failing comparison.
    pub(crate) fn failure_details(&self, index_names: &str) -> String {
        let beyond = if self.score_rounding {
            " (beyond score rounding)"
        } else {
            ""
        };
        let mut text = format!(
            "limits: max_abs {:.2e}{beyond}, nmse {:.1e}",
            self.tolerance.abs_limit(self.stats.max_expected),
            self.tolerance.nmse
        );
        if let Some(first) = &self.first_nonfinite {
            let _ = write!(
                text,
                "; first NaN/inf mismatch at {:?} ({index_names}): {:.7e} against {:.7e} expected",
                first.index, first.actual, first.expected
            );
        }
        if let Some(worst) = &self.worst {
            let _ = write!(
                text,
                "; largest finite error at {:?} ({index_names}): {:.7e} against {:.7e} expected",
                worst.index, worst.actual, worst.expected
            );
        }
        if !self.over_limit_by_head.is_empty() {
            let total: usize = self.over_limit_by_head.iter().map(|(_, n)| n).sum();
            let heads: Vec<String> = self
                .over_limit_by_head
                .iter()
                .take(8)
                .map(|((b, h), n)| format!("b{b} h{h}: {n}"))
                .collect();
            let more = if self.over_limit_by_head.len() > 8 {
                ", ..."
            } else {
                ""
            };
            let _ = write!(
                text,
                "; {total} of {} elements over the limit ({}{more})",
                self.stats.len,
                heads.join(", ")
            );
        }
        text
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        let stats = &self.stats;
        json!({
            "max_abs": stats.max_abs,
            "max_rel": stats.max_rel,
            "nmse": stats.nmse,
            "max_abs_excess": stats.max_abs_excess,
            "nmse_excess": stats.nmse_excess,
            "max_expected": stats.max_expected,
            "len": stats.len,
            "worst_index": stats.worst_index,
            "worst": self.worst.as_ref().map(|worst| json!({
                "index": worst.index,
                "actual": worst.actual,
                "expected": worst.expected,
            })),
            "nonfinite_mismatches": stats.nonfinite_mismatches,
            "first_nonfinite_mismatch": self.first_nonfinite.as_ref().map(|first| json!({
                "index": first.index,
                "actual": first.actual,
                "expected": first.expected,
            })),
            "limits": {
                "max_abs": self.tolerance.abs_limit(stats.max_expected),
                "nmse": self.tolerance.nmse,
            },
            "over_limit_by_head": self.over_limit_by_head.iter().map(|((b, h), count)| json!({
                "batch": b,
                "head": h,
                "count": count,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Turns a flat row-major index into indices of `dims`.
fn unravel(mut flat: usize, dims: &[usize]) -> Vec<usize> {
    let mut index = vec![0; dims.len()];
    for (slot, &dim) in index.iter_mut().zip(dims).rev() {
        *slot = flat % dim.max(1);
        flat /= dim.max(1);
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unravel_row_major() {
        assert_eq!(unravel(107, &[1, 4, 5, 8]), [0, 2, 3, 3]);
        assert_eq!(unravel(0, &[2, 3]), [0, 0]);
        assert_eq!(unravel(5, &[2, 3]), [1, 2]);
    }

    #[test]
    fn counts_errors_per_head() {
        // [1, 2, 2] tensor: head 1 has both elements off by 1.
        let comparison = Comparison::new(
            &[0.0f32, 0.0, 1.0, 1.0],
            &[0.0f64, 0.0, 0.0, 0.0],
            None,
            &[1, 2, 2],
            Tolerance::F32,
            Sides::OneApproximate,
        );
        assert!(!comparison.passes());
        assert_eq!(comparison.over_limit_by_head, [((0, 1), 2)]);
        // Without score sensitivities there is no rounding allowance to be beyond.
        let details = comparison.failure_details("batch, head, col");
        assert!(
            details.starts_with("limits: max_abs 1.00e-5, "),
            "{details}"
        );
        let worst = comparison.worst.unwrap();
        assert_eq!(worst.index, [0, 1, 0]);
        assert_eq!(worst.actual, 1.0);

        let with_allowance = Comparison::new(
            &[0.0f32, 1.0],
            &[0.0f64, 0.0],
            Some(&[0.0, 0.0]),
            &[1, 1, 2],
            Tolerance::F32,
            Sides::OneApproximate,
        );
        let details = with_allowance.failure_details("batch, head, col");
        assert!(details.contains("(beyond score rounding)"), "{details}");
    }

    #[test]
    fn empty_tensors_have_no_worst() {
        let comparison = Comparison::new(
            &[] as &[f32],
            &[] as &[f64],
            None,
            &[1, 1, 0],
            Tolerance::F32,
            Sides::OneApproximate,
        );
        assert!(comparison.passes());
        assert!(comparison.worst.is_none());
        assert!(comparison.first_nonfinite.is_none());
    }

    #[test]
    fn names_first_nonfinite_mismatch() {
        // [1, 2, 2] tensor: element [0, 1, 1] is expected NaN, and the others differ by rounding.
        let comparison = Comparison::new(
            &[0.5f32, 0.25, 1.0, 2.0],
            &[0.5f64, 0.25 + 1e-9, 1.0, f64::NAN],
            None,
            &[1, 2, 2],
            Tolerance::F32,
            Sides::OneApproximate,
        );
        assert!(!comparison.passes());
        let first = comparison.first_nonfinite.as_ref().unwrap();
        assert_eq!(first.index, [0, 1, 1]);
        assert_eq!(first.actual, 2.0);
        assert!(first.expected.is_nan());
        let details = comparison.failure_details("batch, head, col");
        assert!(
            details.contains("first NaN/inf mismatch at [0, 1, 1]"),
            "{details}"
        );
        assert_eq!(comparison.worst.as_ref().unwrap().index, [0, 0, 1]);

        // A mismatch at element 0 with every finite element exact: the largest finite error is
        // the first finite element's, not the mismatch.
        let comparison = Comparison::new(
            &[f32::NAN, 1.0],
            &[0.5f64, 1.0],
            None,
            &[1, 1, 2],
            Tolerance::F32,
            Sides::OneApproximate,
        );
        assert_eq!(
            comparison.first_nonfinite.as_ref().unwrap().index,
            [0, 0, 0]
        );
        assert_eq!(comparison.worst.as_ref().unwrap().index, [0, 0, 1]);
    }

    #[test]
    fn both_approximate_doubles_limits() {
        // 1.5e-5 is over the f32 limit of 1e-5 but within twice it.
        let (actual, expected) = ([1.000015f64], [1.0f64]);
        let one_side = Comparison::new(
            &actual,
            &expected,
            None,
            &[1, 1, 1],
            Tolerance::F32,
            Sides::OneApproximate,
        );
        let both_sides = Comparison::new(
            &actual,
            &expected,
            None,
            &[1, 1, 1],
            Tolerance::F32,
            Sides::BothApproximate,
        );
        assert!(!one_side.passes());
        assert_eq!(both_sides.tolerance.abs, 2e-5);
        assert_eq!(both_sides.tolerance.nmse, 4e-10);
        assert!(both_sides.passes());
    }
}
