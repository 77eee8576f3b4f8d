//! Merging attention results computed over disjoint key ranges.

use crate::attention::AttentionOutput;
use crate::error::{Error, Result};

/// Merges two attention results over disjoint key ranges of the same queries into the result
/// over both ranges, exact up to rounding.
///
/// Each input contains outputs `[rows, head_dim]` (`head_dim` is the value head dim) and
/// log-sum-exps `[rows]`, as [`crate::Context::attention_with`] returns them for the default
/// BHSD layout, packed or not. Other layouts order their output rows unlike the log-sum-exp.
/// With sinks, give them to one of the two calls only, or they count twice.
///
/// With `m = max(lse_a, lse_b)` and weights `w = exp(lse - m)`, the merged output is `(w_a · out_a + w_b · out_b) / (w_a + w_b)` and the
/// merged log-sum-exp is `m + ln(w_a + w_b)`, computed in f64. A row that neither range saw
/// (both log-sum-exps `-inf`) stays output 0 and log-sum-exp `-inf`. This is how a long
/// context can be split across dispatches or devices.
///
/// # Errors
///
/// [`Error::LengthMismatch`] when the two results differ in size, or when an output's length is
/// not `head_dim` times its number of log-sum-exps.
pub fn merge_partials(
    head_dim: usize,
    first: &AttentionOutput,
    second: &AttentionOutput,
) -> Result<AttentionOutput> {
    if head_dim == 0 {
        return Err(Error::ZeroDimension { name: "head_dim" });
    }
    let rows = first.lse.len();
    let check = |tensor: &'static str, actual: usize, expected: usize| {
        if actual == expected {
            Ok(())
        } else {
            Err(Error::LengthMismatch {
                tensor,
                expected,
                actual,
                shape: format!("[{rows}, {head_dim}] (the first result's lse rows × head_dim)"),
            })
        }
    };
    check("lse", second.lse.len(), rows)?;
    check("out", first.out.len(), rows * head_dim)?;
    check("out", second.out.len(), rows * head_dim)?;

    let mut out = Vec::with_capacity(rows * head_dim);
    let mut lse = Vec::with_capacity(rows);
    for row in 0..rows {
        let (lse_a, lse_b) = (f64::from(first.lse[row]), f64::from(second.lse[row]));
        let max = lse_a.max(lse_b);
        let out_a = &first.out[row * head_dim..][..head_dim];
        let out_b = &second.out[row * head_dim..][..head_dim];
        if max == f64::NEG_INFINITY {
            out.extend(std::iter::repeat_n(0.0, head_dim));
            lse.push(f32::NEG_INFINITY);
            continue;
        }
        let (weight_a, weight_b) = ((lse_a - max).exp(), (lse_b - max).exp());
        let total = weight_a + weight_b;
        out.extend(
            out_a.iter().zip(out_b).map(|(&a, &b)| {
                ((weight_a * f64::from(a) + weight_b * f64::from(b)) / total) as f32
            }),
        );
        lse.push((max + total.ln()) as f32);
    }
    Ok(AttentionOutput { out, lse })
}
