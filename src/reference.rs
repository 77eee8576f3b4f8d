//! The CPU reference: the semantics every kernel is checked against.
//!
//! It computes each output row on its own, in f64, with no tiling, no online softmax and no
//! speed tricks, following the same steps as the kernels:
//!
//! 1. scores: `s[j] = scale · q · k[j]`, soft-capped to `softcap · tanh(s[j] / softcap)` when
//!    set, then `s[j] += mask[j]`, then `s[j] = -inf` where the causal mask or the sliding window
//!    forbids key `j`;
//! 2. softmax: `m = max_j s[j]`, `l = Σ_j exp(s[j] - m)`, `lse = m + ln l`,
//!    `p[j] = exp(s[j] - lse)`;
//! 3. output: `out = Σ_j p[j] · v[j]`.
//!
//! A row whose every score is `-inf` (fully masked) has `lse = -inf`, probabilities 0 and output
//! 0, never NaN. Masked keys (score `-inf`) are skipped in step 3, so their value rows are never
//! read. NaN in an input propagates otherwise: a NaN score makes its row's maximum, sum and
//! output NaN, and a NaN in the value row of an unmasked key makes that output column NaN. A
//! `+inf` score makes its row NaN, as `exp(inf - inf)` is NaN.

use crate::error::Result;
use crate::problem::{AttentionInputs, AttentionProblem};

/// The reference result of one attention call, in f64.
#[derive(Clone, Debug)]
pub struct ReferenceOutput {
    /// Output, `[batch, heads, seq_q, head_dim]`.
    pub out: Vec<f64>,
    /// Natural-log log-sum-exp of each row's final scores, `[batch, heads, seq_q]`.
    pub lse: Vec<f64>,
}

impl ReferenceOutput {
    /// The output rounded to f32, for comparison with a kernel's output.
    pub fn out_f32(&self) -> Vec<f32> {
        self.out.iter().map(|&x| x as f32).collect()
    }
}

/// One row of the reference: output, log-sum-exp and probabilities.
#[derive(Clone, Debug)]
pub struct ReferenceRow {
    /// Output row, `head_dim` values.
    pub out: Vec<f64>,
    /// Log-sum-exp of the row's scores.
    pub lse: f64,
    /// Softmax probabilities over the `seq_kv` keys.
    pub probs: Vec<f64>,
}

/// Computes full attention on the CPU in f64.
///
/// # Errors
///
/// Returns the same errors as the GPU path for an invalid problem or mismatched slice lengths.
pub fn attention(
    problem: &AttentionProblem,
    inputs: &AttentionInputs<'_>,
) -> Result<ReferenceOutput> {
    problem.validate()?;
    inputs.validate(problem)?;
    let s = &problem.shape;
    let mut out = Vec::with_capacity(s.q_len());
    let mut lse = Vec::with_capacity(s.lse_len());
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.seq_q {
                let row = row_unchecked(problem, inputs, b, h, i);
                out.extend_from_slice(&row.out);
                lse.push(row.lse);
            }
        }
    }
    Ok(ReferenceOutput { out, lse })
}

/// Computes one output row `(b, h, i)` on the CPU in f64, for checking large problems by sampling.
///
/// # Errors
///
/// Returns the errors of [`attention`]; an index out of range is reported as a zero-size problem
/// is, through [`crate::Error::LengthMismatch`] on `q`.
pub fn attention_row(
    problem: &AttentionProblem,
    inputs: &AttentionInputs<'_>,
    b: usize,
    h: usize,
    i: usize,
) -> Result<ReferenceRow> {
    problem.validate()?;
    inputs.validate(problem)?;
    let s = &problem.shape;
    if b >= s.batch || h >= s.heads || i >= s.seq_q {
        return Err(crate::Error::LengthMismatch {
            tensor: "q",
            expected: s.q_len(),
            actual: ((b * s.heads + h) * s.seq_q + i) * s.head_dim,
            shape: format!(
                "{:?} (row index (b={b}, h={h}, i={i}) is out of range)",
                s.q_dims()
            ),
        });
    }
    Ok(row_unchecked(problem, inputs, b, h, i))
}

fn row_unchecked(
    problem: &AttentionProblem,
    inputs: &AttentionInputs<'_>,
    b: usize,
    h: usize,
    i: usize,
) -> ReferenceRow {
    let s = &problem.shape;
    let d = s.head_dim;
    let kv_head = h / s.group_size();
    let q_row = &inputs.q[((b * s.heads + h) * s.seq_q + i) * d..][..d];
    let kv_base = (b * s.kv_heads + kv_head) * s.seq_kv * d;
    let (mask_batch_stride, mask_head_stride) = problem.mask_strides();
    let mask_row = inputs.mask.map(|mask| {
        &mask[b * mask_batch_stride + h * mask_head_stride + i * s.seq_kv..][..s.seq_kv]
    });
    let scale = problem.scale();

    // Step 1: scores, soft-capping, then the additive mask, then the causal mask and window.
    let mut scores = vec![0.0f64; s.seq_kv];
    for (j, score) in scores.iter_mut().enumerate() {
        let k_row = &inputs.k[kv_base + j * d..][..d];
        let dot: f64 = q_row
            .iter()
            .zip(k_row)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        *score = problem.cap(scale * dot);
        if let Some(mask_row) = mask_row {
            *score += mask_row[j] as f64;
        }
        if !problem.allows(i, j) {
            *score = f64::NEG_INFINITY;
        }
    }

    // Step 2: softmax with the row maximum subtracted; a fully masked row gets zeros.
    let max = scores
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64_max_propagating_nan);
    let (lse, probs) = if max == f64::NEG_INFINITY {
        (f64::NEG_INFINITY, vec![0.0; s.seq_kv])
    } else {
        let sum: f64 = scores.iter().map(|&x| (x - max).exp()).sum();
        let lse = max + sum.ln();
        (lse, scores.iter().map(|&x| (x - lse).exp()).collect())
    };

    // Step 3: probabilities times values.
    let mut out = vec![0.0f64; d];
    if max != f64::NEG_INFINITY {
        for (j, &p) in probs.iter().enumerate() {
            if scores[j] == f64::NEG_INFINITY {
                continue;
            }
            let v_row = &inputs.v[kv_base + j * d..][..d];
            for (o, &v) in out.iter_mut().zip(v_row) {
                *o += p * v as f64;
            }
        }
    }
    ReferenceRow { out, lse, probs }
}

/// Returns the larger of `a` and `b`, or NaN when either is NaN (`f64::max` would drop the NaN).
fn f64_max_propagating_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}
