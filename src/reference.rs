//! The CPU reference: the semantics every kernel is checked against.
//!
//! It computes each output row on its own, in f64, with no tiling, no online softmax and no
//! speed tricks, following the same steps as the kernels. For query row `i` of batch element
//! `b` and query head `h`, whose sequence has `rows` queries and `keys` keys (the shape's
//! lengths, or the packed sequence's own):
//!
//! 1. scores: `s[j] = scale · q · k[j]`, soft-capped to `softcap · tanh(s[j] / softcap)` when
//!    set. The ALiBi bias `-slope[h] · |j - (i + keys - rows)|` is added when slopes are given,
//!    then `mask[j]`. Last, `s[j] = -inf` where the causal mask or the sliding window forbids
//!    key `j`, or where `j` is at or past the key length;
//! 2. softmax: `m = max(sink, max_j s[j])`, `l = exp(sink - m) + Σ_j exp(s[j] - m)` (the sink
//!    terms only with sinks), `lse = m + ln l`, `p[j] = exp(s[j] - m) / l`, which equals
//!    `exp(s[j] - lse)` but keeps its sum at 1 where `m` is near `f32::MIN`;
//! 3. output: `out = Σ_j p[j] · v[j]`.
//!
//! A row whose every score is `-inf` (fully masked) has `lse = -inf` (or the sink, with sinks),
//! probabilities 0 and output 0, never NaN.
//!
//! NaN and infinity propagate as follows, and every kernel follows the same rules:
//!
//! - a score that is NaN or `+inf` (from NaN or infinity in `q`, an attended key's `k`, the mask
//!   or the slopes, or a NaN or `+inf` sink) makes its row's log-sum-exp, probabilities and every
//!   output column NaN, as `exp(inf - inf)` is NaN; a score of `-inf` is a masked key;
//! - a NaN or infinity in the value row of a key with nonzero probability reaches that output
//!   column (NaN where infinities of both signs meet);
//! - the value row of a key with probability 0 is never read: masked keys, keys past the key
//!   length or outside the causal mask and window, and keys whose probability underflows to 0.
//!   The kernels compute probabilities in f32, where that underflow comes sooner, so a key with
//!   a probability below about 1e-38 and a NaN value may give NaN here and not on the GPU.

use crate::error::Result;
use crate::inputs::AttentionInputs;
use crate::problem::{AttentionProblem, Sequence};

/// The reference result of one attention call, in f64.
#[derive(Clone, Debug)]
pub struct ReferenceOutput {
    /// Output in the problem's output layout (`[batch, heads, seq_q, head_dim_v]` by default);
    /// elements the layout does not address are 0.
    pub out: Vec<f64>,
    /// Natural-log log-sum-exp of each row's final scores, `[batch, heads, seq_q]`, or
    /// `[heads, total_q]` with packed sequences.
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
    /// Output row, `head_dim_v` values.
    pub out: Vec<f64>,
    /// Log-sum-exp of the row's scores.
    pub lse: f64,
    /// Softmax probabilities over the `seq_kv` keys of the row's sequence.
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
    let strides = problem.strides().out;
    let (lse_batch, lse_head) = problem.lse_strides();
    let mut out = vec![0.0; problem.spans()[3]];
    let mut lse = vec![0.0; problem.lse_len()];
    for b in 0..s.batch {
        let sequence = inputs.sequence(problem, b);
        for h in 0..s.heads {
            for i in 0..sequence.rows {
                let row = row_unchecked(problem, inputs, &sequence, b, h, i);
                let offset = strides.offset(b, h, sequence.row_begin + i);
                out[offset..][..s.head_dim_v].copy_from_slice(&row.out);
                lse[b * lse_batch + h * lse_head + sequence.row_begin + i] = row.lse;
            }
        }
    }
    Ok(ReferenceOutput { out, lse })
}

/// Computes one output row `(b, h, i)` on the CPU in f64, for checking large problems by sampling.
/// With packed sequences `i` counts from the start of sequence `b`.
///
/// # Errors
///
/// Returns the errors of [`attention`], and [`crate::Error::RowOutOfRange`] for an index outside
/// the problem.
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
    let rows = if b < s.batch {
        inputs.sequence(problem, b).rows
    } else {
        0
    };
    if h >= s.heads || i >= rows {
        return Err(crate::Error::RowOutOfRange {
            b,
            h,
            i,
            batch: s.batch,
            heads: s.heads,
            rows,
        });
    }
    let sequence = inputs.sequence(problem, b);
    Ok(row_unchecked(problem, inputs, &sequence, b, h, i))
}

fn row_unchecked(
    problem: &AttentionProblem,
    inputs: &AttentionInputs<'_>,
    sequence: &Sequence,
    b: usize,
    h: usize,
    i: usize,
) -> ReferenceRow {
    let s = &problem.shape;
    let (d, dv) = (s.head_dim, s.head_dim_v);
    let kv_head = h / s.group_size();
    let strides = problem.strides();
    let q_row = &inputs.q[strides.q.offset(b, h, sequence.row_begin + i)..][..d];
    let k_row = |j: usize| &inputs.k[strides.k.offset(b, kv_head, sequence.key_begin + j)..][..d];
    let v_row = |j: usize| &inputs.v[strides.v.offset(b, kv_head, sequence.key_begin + j)..][..dv];
    let (mask_batch_stride, mask_head_stride) = problem.mask_strides();
    let mask_row = inputs.mask.map(|mask| {
        &mask[b * mask_batch_stride + h * mask_head_stride + i * s.seq_kv..][..s.seq_kv]
    });
    let slope = inputs.alibi_slopes.map(|slopes| f64::from(slopes[h]));
    let sink = inputs.sinks.map(|sinks| f64::from(sinks[h]));
    let scale = problem.scale();

    // Step 1: scores, soft-capping, the ALiBi bias, the additive mask, then the causal mask, the
    // window and the key length. Keys past the sequence's own keys are never read.
    let keys = sequence.keys.min(s.seq_kv);
    let mut scores = vec![f64::NEG_INFINITY; keys];
    for (j, score) in scores.iter_mut().enumerate() {
        if !problem.allows_in(sequence, i, j) {
            continue;
        }
        let dot: f64 = q_row
            .iter()
            .zip(k_row(j))
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        *score = problem.cap(scale * dot);
        if let Some(slope) = slope {
            *score -= slope * (j as i64 - sequence.diagonal(i)).abs() as f64;
        }
        if let Some(mask_row) = mask_row {
            *score += mask_row[j] as f64;
        }
    }

    // Step 2: softmax with the row maximum subtracted; a fully masked row gets zeros.
    let max = scores
        .iter()
        .copied()
        .chain(sink)
        .fold(f64::NEG_INFINITY, f64_max_propagating_nan);
    let (lse, probs) = if max == f64::NEG_INFINITY {
        (f64::NEG_INFINITY, vec![0.0; keys])
    } else {
        // The probabilities divide by the sum rather than subtract the log-sum-exp. Next to a
        // maximum near f32::MIN (-3.4e38), a common mask value, ln(sum) is below half an f64
        // ulp and vanishes from the log-sum-exp, so subtracting it would leave every
        // probability at 1.
        let sum: f64 = scores.iter().chain(&sink).map(|&x| (x - max).exp()).sum();
        let lse = max + sum.ln();
        (lse, scores.iter().map(|&x| (x - max).exp() / sum).collect())
    };

    // Step 3: probabilities times values.
    let mut out = vec![0.0f64; dv];
    for (j, &p) in probs.iter().enumerate() {
        if scores[j] == f64::NEG_INFINITY || p == 0.0 {
            continue;
        }
        for (o, &v) in out.iter_mut().zip(v_row(j)) {
            *o += p * v as f64;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::AttentionShape;

    #[test]
    fn rows_of_minimum_float_scores_sum_to_one() {
        // Every key masked with f32::MIN: the scores are equal, so each key weighs 1/2.
        let problem = AttentionProblem::new(AttentionShape::new(1, 1, 1, 2, 1)).with_mask(1, 1);
        let (q, k, v) = ([0.5f32], [0.25f32, -0.75], [1.0f32, 3.0]);
        let mask = [f32::MIN, f32::MIN];
        let inputs = AttentionInputs::new(&q, &k, &v).with_mask(&mask);
        let row = attention_row(&problem, &inputs, 0, 0, 0).unwrap();
        assert_eq!(row.probs, [0.5, 0.5]);
        assert_eq!(row.out, [2.0]);
        assert_eq!(row.lse, f64::from(f32::MIN));
    }
}
