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
//! Beside each output element and log-sum-exp, the reference returns its sensitivity to rounding
//! in the scores. Each score is a sum of terms: the products `q[d] · k[d]` times the scale, the
//! ALiBi bias and the mask. An f32 kernel rounds score `j` by a small multiple of 2⁻²⁴ times
//! its terms' magnitude `M[j] = |scale| · Σ_d |q[d] · k[d]| + |bias[j]| + |mask[j]|`. With
//! soft-capping, the first term is multiplied by the cap's derivative `1 - tanh²` and the capped
//! score is added.
//!
//! To first order, score errors `δ[j]` with `|δ[j]| ≤ ε · M[j]` move the log-sum-exp by at most
//! `ε · E`, where `E = Σ_j p[j] · M[j]`. Output column `c` moves by
//! `Σ_j p[j] · (δ[j] - Σ_k p[k] · δ[k]) · v[j][c]`, which is at most
//! `ε · Σ_j p[j] · |v[j][c]| · ((1 - 2 p[j]) · M[j] + E)` and stays small where one key takes
//! nearly all the probability. These bounds without `ε` are the sensitivities, and
//! [`crate::validate::ErrorStats::compare_allowing_score_rounding`] turns them into an
//! allowance. They matter where scores are large (explicit scales far above `1/√d`, ALiBi biases
//! in the thousands, masks that add the same large value to a whole row), and are small beside
//! the tolerances elsewhere.
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
    /// Sensitivity of each output element to rounding in its row's scores (see the module
    /// documentation), laid out as `out`.
    pub out_score_sensitivity: Vec<f64>,
    /// Sensitivity of each log-sum-exp to rounding in its row's scores, laid out as `lse`.
    pub lse_score_sensitivity: Vec<f64>,
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
    /// Sensitivity of each output column to rounding in the row's scores (see the module
    /// documentation).
    pub out_score_sensitivity: Vec<f64>,
    /// Sensitivity of the log-sum-exp to rounding in the row's scores.
    pub lse_score_sensitivity: f64,
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
    compute(problem, inputs, None)
}

/// Computes full attention on the CPU in f64 as [`attention`] does, and also returns the softmax
/// probabilities, `[batch, heads, seq_q, seq_kv]` as fixture files store them. With packed
/// sequences, row `i` of sequence `b` sits at `(b, h, i)`. Entries past a sequence's own rows
/// and keys are 0.
///
/// # Errors
///
/// Returns the errors of [`attention`], and [`crate::Error::SizeOverflow`] when the
/// probabilities have more elements than `usize` counts.
pub fn attention_with_probs(
    problem: &AttentionProblem,
    inputs: &AttentionInputs<'_>,
) -> Result<(ReferenceOutput, Vec<f64>)> {
    let s = &problem.shape;
    let len = [s.heads, s.seq_q, s.seq_kv]
        .iter()
        .try_fold(s.batch, |len, &dim| len.checked_mul(dim))
        .ok_or_else(|| crate::Error::SizeOverflow {
            what: "the attention probabilities [batch, heads, seq_q, seq_kv]".to_string(),
        })?;
    let mut probs = vec![0.0; len];
    let output = compute(problem, inputs, Some(&mut probs))?;
    Ok((output, probs))
}

/// Computes every row, and writes each row's probabilities into `probs` when given.
fn compute(
    problem: &AttentionProblem,
    inputs: &AttentionInputs<'_>,
    mut probs: Option<&mut [f64]>,
) -> Result<ReferenceOutput> {
    problem.validate()?;
    inputs.validate(problem)?;
    let s = &problem.shape;
    let strides = problem.strides().out;
    let (lse_batch, lse_head) = problem.lse_strides();
    let mut out = vec![0.0; problem.spans()[3]];
    let mut lse = vec![0.0; problem.lse_len()];
    let mut out_score_sensitivity = vec![0.0; out.len()];
    let mut lse_score_sensitivity = vec![0.0; lse.len()];
    for b in 0..s.batch {
        let sequence = inputs.sequence(problem, b);
        for h in 0..s.heads {
            for i in 0..sequence.rows {
                let row = row_unchecked(problem, inputs, &sequence, b, h, i);
                let offset = strides.offset(b, h, sequence.row_begin + i);
                out[offset..][..s.head_dim_v].copy_from_slice(&row.out);
                out_score_sensitivity[offset..][..s.head_dim_v]
                    .copy_from_slice(&row.out_score_sensitivity);
                let lse_index = b * lse_batch + h * lse_head + sequence.row_begin + i;
                lse[lse_index] = row.lse;
                lse_score_sensitivity[lse_index] = row.lse_score_sensitivity;
                if let Some(probs) = probs.as_deref_mut() {
                    let start = ((b * s.heads + h) * s.seq_q + i) * s.seq_kv;
                    probs[start..][..row.probs.len()].copy_from_slice(&row.probs);
                }
            }
        }
    }
    Ok(ReferenceOutput {
        out,
        lse,
        out_score_sensitivity,
        lse_score_sensitivity,
    })
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
    // The magnitude of each score's terms, which its f32 rounding scales with.
    let mut magnitudes = vec![0.0f64; keys];
    for (j, (score, magnitude)) in scores.iter_mut().zip(&mut magnitudes).enumerate() {
        if !problem.allows_in(sequence, i, j) {
            continue;
        }
        let (mut dot, mut dot_magnitude) = (0.0f64, 0.0f64);
        for (&a, &b) in q_row.iter().zip(k_row(j)) {
            let product = a as f64 * b as f64;
            dot += product;
            dot_magnitude += product.abs();
        }
        *score = problem.cap(scale * dot);
        *magnitude = scale.abs() * dot_magnitude;
        if let Some(softcap) = problem.softcap {
            // Capping scales the scaled product's error by its derivative, 1 - tanh², and rounds
            // the capped score once more.
            let tanh = *score / softcap;
            *magnitude = *magnitude * (1.0 - tanh * tanh) + score.abs();
        }
        if let Some(slope) = slope {
            let bias = slope * (j as i64 - sequence.diagonal(i)).abs() as f64;
            *score -= bias;
            *magnitude += bias.abs();
        }
        if let Some(mask_row) = mask_row {
            *score += mask_row[j] as f64;
            *magnitude += (mask_row[j] as f64).abs();
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

    // Step 3: probabilities times values, with the sums of the rounding sensitivities.
    let mut out = vec![0.0f64; dv];
    let mut own_magnitude = vec![0.0f64; dv];
    let mut weighted_abs = vec![0.0f64; dv];
    let mut lse_score_sensitivity = 0.0;
    for (j, &p) in probs.iter().enumerate() {
        if scores[j] == f64::NEG_INFINITY || p == 0.0 {
            continue;
        }
        lse_score_sensitivity += p * magnitudes[j];
        let own = p * (1.0 - 2.0 * p) * magnitudes[j];
        for (c, &v) in v_row(j).iter().enumerate() {
            let v = v as f64;
            out[c] += p * v;
            own_magnitude[c] += own * v.abs();
            weighted_abs[c] += p * v.abs();
        }
    }
    let out_score_sensitivity = own_magnitude
        .iter()
        .zip(&weighted_abs)
        .map(|(&own, &pv)| (own + lse_score_sensitivity * pv).max(0.0))
        .collect();
    ReferenceRow {
        out,
        lse,
        probs,
        out_score_sensitivity,
        lse_score_sensitivity,
    }
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

    #[test]
    fn single_key_output_has_no_score_sensitivity() {
        // With one key, p = 1 whatever the score, so score rounding moves only the lse.
        let problem = AttentionProblem::new(AttentionShape::new(1, 1, 1, 1, 2)).with_scale(10.0);
        let (q, k, v) = ([0.5f32, -1.0], [2.0f32, 0.25], [3.0f32, -1.0]);
        let row = attention_row(&problem, &AttentionInputs::new(&q, &k, &v), 0, 0, 0).unwrap();
        assert_eq!(row.out_score_sensitivity, [0.0, 0.0]);
        // M = 10 · (|0.5 · 2| + |-1 · 0.25|) = 12.5.
        assert_eq!(row.lse_score_sensitivity, 12.5);
    }

    #[test]
    fn two_key_sensitivity_matches_bound() {
        // Equal scores (1 and -1 + 2): p = 1/2 each. M = [1, 3]: |q · k| = 1 for both keys, plus
        // the mask of 2 on key 1.
        let problem = AttentionProblem::new(AttentionShape::new(1, 1, 1, 2, 1))
            .with_scale(1.0)
            .with_mask(1, 1);
        let (q, k, v) = ([1.0f32], [1.0f32, -1.0], [4.0f32, -2.0]);
        let mask = [0.0f32, 2.0];
        let inputs = AttentionInputs::new(&q, &k, &v).with_mask(&mask);
        let row = attention_row(&problem, &inputs, 0, 0, 0).unwrap();
        assert_eq!(row.probs, [0.5, 0.5]);
        assert_eq!(row.lse_score_sensitivity, 2.0);
        // Σ_j p · |v| · ((1 - 2p) · M + E) = 0.5 · 4 · 2 + 0.5 · 2 · 2 = 6.
        assert_eq!(row.out_score_sensitivity, [6.0]);
    }

    #[test]
    fn probs_match_row_probs() {
        // Top-left causal over 3 × 5: row i attends to keys 0..=i, and the rest of each row is 0.
        let problem = AttentionProblem::new(AttentionShape::new(2, 2, 3, 5, 4))
            .with_causal(crate::Causal::TopLeft);
        let data = crate::OwnedInputs::random(&problem, 3);
        let (output, probs) = attention_with_probs(&problem, &data.inputs()).unwrap();
        assert_eq!(probs.len(), 2 * 2 * 3 * 5);
        assert_eq!(output.out, attention(&problem, &data.inputs()).unwrap().out);
        for (index, row_probs) in probs.chunks(5).enumerate() {
            let (b, h, i) = (index / 6, index / 3 % 2, index % 3);
            let row = attention_row(&problem, &data.inputs(), b, h, i).unwrap();
            assert_eq!(row_probs, row.probs, "row {index}");
            assert!(row_probs[i + 1..].iter().all(|&p| p == 0.0), "row {index}");
        }
    }
}
