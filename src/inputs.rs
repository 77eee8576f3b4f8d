//! Host-side tensors of one attention call: the borrowed [`AttentionInputs`] that the entry
//! points take, the owned [`OwnedInputs`] that builds them, and the checks of their lengths
//! and offsets against an [`AttentionProblem`].

use crate::error::{Error, Result};
use crate::f16;
use crate::problem::{AttentionProblem, KeyLengths, Layout, Sequence};

/// Host-side inputs of one attention call, in the problem's layout, with elements of type `T`
/// (`f32`, or [`half::f16`] for [`crate::Context::attention_f16`]).
///
/// Build it with [`AttentionInputs::new`] and the `with_*` methods. The optional per-head and
/// per-sequence tensors are f32 or u32 whatever `T` is.
#[derive(Clone, Copy, Debug)]
pub struct AttentionInputs<'a, T = f32> {
    /// Queries: `[batch, heads, seq_q, head_dim]` in the default layout.
    pub q: &'a [T],
    /// Keys: `[batch, kv_heads, seq_kv, head_dim]` in the default layout.
    pub k: &'a [T],
    /// Values: `[batch, kv_heads, seq_kv, head_dim_v]` in the default layout.
    pub v: &'a [T],
    /// Additive mask, `[mask_batch, mask_heads, seq_q, seq_kv]`, when the problem has one.
    pub mask: Option<&'a [f32]>,
    /// ALiBi slopes, `[heads]`: query `i` and key `j` get the bias
    /// `-slope[h] · |j - (i + seq_kv - seq_q)|`, added after soft-capping and before the mask.
    pub alibi_slopes: Option<&'a [f32]>,
    /// Sink logits, `[heads]`: each joins its head's softmax denominator as a score with no
    /// value row, so `lse = ln(exp(sink) + Σ exp(s))`.
    pub sinks: Option<&'a [f32]>,
    /// Key lengths, `[batch]`: keys `j >= kv_seq_lens[b]` are masked for batch element `b`.
    pub kv_seq_lens: Option<&'a [u32]>,
    /// Offsets of packed query sequences, `[batch + 1]`, non-decreasing, when the problem has
    /// packed sequences.
    pub cu_seqlens_q: Option<&'a [u32]>,
    /// Offsets of packed key sequences, `[batch + 1]`, non-decreasing, when the problem has
    /// packed sequences.
    pub cu_seqlens_kv: Option<&'a [u32]>,
}

impl<'a, T> AttentionInputs<'a, T> {
    /// Inputs of Q, K and V with no optional tensors.
    pub fn new(q: &'a [T], k: &'a [T], v: &'a [T]) -> Self {
        Self {
            q,
            k,
            v,
            mask: None,
            alibi_slopes: None,
            sinks: None,
            kv_seq_lens: None,
            cu_seqlens_q: None,
            cu_seqlens_kv: None,
        }
    }

    /// Adds the additive mask declared by [`AttentionProblem::with_mask`].
    pub fn with_mask(mut self, mask: &'a [f32]) -> Self {
        self.mask = Some(mask);
        self
    }

    /// Adds ALiBi slopes, one per query head.
    pub fn with_alibi_slopes(mut self, slopes: &'a [f32]) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }

    /// Adds attention sinks, one logit per query head.
    pub fn with_sinks(mut self, sinks: &'a [f32]) -> Self {
        self.sinks = Some(sinks);
        self
    }

    /// Adds key lengths, one per batch element.
    pub fn with_kv_seq_lens(mut self, lens: &'a [u32]) -> Self {
        self.kv_seq_lens = Some(lens);
        self
    }

    /// Adds the offsets of packed sequences declared by [`AttentionProblem::with_packed`].
    pub fn with_cu_seqlens(mut self, q: &'a [u32], kv: &'a [u32]) -> Self {
        self.cu_seqlens_q = Some(q);
        self.cu_seqlens_kv = Some(kv);
        self
    }

    /// Returns the same inputs with Q, K and V replaced, keeping every optional tensor.
    pub fn with_tensors<U>(&self, q: &'a [U], k: &'a [U], v: &'a [U]) -> AttentionInputs<'a, U> {
        AttentionInputs {
            q,
            k,
            v,
            mask: self.mask,
            alibi_slopes: self.alibi_slopes,
            sinks: self.sinks,
            kv_seq_lens: self.kv_seq_lens,
            cu_seqlens_q: self.cu_seqlens_q,
            cu_seqlens_kv: self.cu_seqlens_kv,
        }
    }

    /// Checks every slice length, and every length and offset, against the problem.
    ///
    /// # Errors
    ///
    /// [`Error::LengthMismatch`] for a slice of the wrong length, [`Error::MaskMismatch`] or
    /// [`Error::PackedMismatch`] for a tensor given without its declaration in the problem (or
    /// the reverse), [`Error::MissingKeyLengths`] for [`KeyLengths::Cache`] without key lengths,
    /// and [`Error::InvalidLengths`] for an offset or length out of range.
    pub fn validate(&self, problem: &AttentionProblem) -> Result<()> {
        let s = &problem.shape;
        let spans = problem.spans();
        // Named layouts address every element; strided views may be longer than they address.
        let exact = !matches!(problem.layout, Layout::Strided(_));
        let [q, k, v, _] = problem.layout_shapes();
        check_len("q", self.q.len(), spans[0], q, exact)?;
        check_len("k", self.k.len(), spans[1], k, exact)?;
        check_len("v", self.v.len(), spans[2], v, exact)?;
        check_mask(problem, self.mask.map(<[f32]>::len))?;

        let lens = OptionalLens {
            alibi_slopes: self.alibi_slopes.map(<[f32]>::len),
            sinks: self.sinks.map(<[f32]>::len),
            kv_seq_lens: self.kv_seq_lens.map(<[u32]>::len),
            cu_seqlens: match (self.cu_seqlens_q, self.cu_seqlens_kv) {
                (None, None) => None,
                (q, kv) => Some((q.map_or(0, <[u32]>::len), kv.map_or(0, <[u32]>::len))),
            },
        };
        lens.check(problem, true)?;

        if let Some(lens) = self.kv_seq_lens {
            for (index, &value) in lens.iter().enumerate() {
                if value as usize > s.seq_kv {
                    return Err(Error::InvalidLengths {
                        tensor: "kv_seq_lens",
                        index,
                        value,
                        reason: format!("it is over seq_kv = {}", s.seq_kv),
                        fix: "give each batch element's number of valid keys, at most seq_kv",
                    });
                }
            }
        }

        if let (Some(packed), Some(cu_q), Some(cu_kv)) =
            (problem.packed, self.cu_seqlens_q, self.cu_seqlens_kv)
        {
            check_offsets("cu_seqlens_q", cu_q, s.seq_q, packed.total_q)?;
            check_offsets("cu_seqlens_kv", cu_kv, s.seq_kv, packed.total_kv)?;
        }
        Ok(())
    }

    /// Batch element `b`'s sequence. Call [`AttentionInputs::validate`] first.
    pub fn sequence(&self, problem: &AttentionProblem, b: usize) -> Sequence {
        let mut sequence = Sequence::dense(&problem.shape);
        if let (Some(cu_q), Some(cu_kv)) = (self.cu_seqlens_q, self.cu_seqlens_kv) {
            sequence.row_begin = cu_q[b] as usize;
            sequence.key_begin = cu_kv[b] as usize;
            sequence.rows = (cu_q[b + 1] - cu_q[b]) as usize;
            sequence.keys = (cu_kv[b + 1] - cu_kv[b]) as usize;
            sequence.key_limit = sequence.keys;
            sequence.anchor = sequence.keys;
        }
        if let Some(lens) = self.kv_seq_lens {
            sequence.key_limit = sequence.key_limit.min(lens[b] as usize);
            if problem.key_lengths == KeyLengths::Cache {
                sequence.anchor = sequence.key_limit;
            }
        }
        sequence
    }
}

/// Owned host-side tensors of one attention call, for callers that generate or load them;
/// [`OwnedInputs::inputs`] lends them as [`AttentionInputs`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OwnedInputs<T = f32> {
    /// Queries in the problem's layout.
    pub q: Vec<T>,
    /// Keys in the problem's layout.
    pub k: Vec<T>,
    /// Values in the problem's layout.
    pub v: Vec<T>,
    /// Additive mask, `[mask_batch, mask_heads, seq_q, seq_kv]`.
    pub mask: Option<Vec<f32>>,
    /// ALiBi slopes, `[heads]`.
    pub alibi_slopes: Option<Vec<f32>>,
    /// Sink logits, `[heads]`.
    pub sinks: Option<Vec<f32>>,
    /// Key lengths, `[batch]`.
    pub kv_seq_lens: Option<Vec<u32>>,
    /// Offsets of packed query and key sequences, `[batch + 1]` each.
    pub cu_seqlens: Option<(Vec<u32>, Vec<u32>)>,
}

impl<T> OwnedInputs<T> {
    /// Returns borrowed inputs over these tensors.
    pub fn inputs(&self) -> AttentionInputs<'_, T> {
        AttentionInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            mask: self.mask.as_deref(),
            alibi_slopes: self.alibi_slopes.as_deref(),
            sinks: self.sinks.as_deref(),
            kv_seq_lens: self.kv_seq_lens.as_deref(),
            cu_seqlens_q: self.cu_seqlens.as_ref().map(|(q, _)| q.as_slice()),
            cu_seqlens_kv: self.cu_seqlens.as_ref().map(|(_, kv)| kv.as_slice()),
        }
    }
}

impl OwnedInputs {
    /// Rounds Q, K and V to f16, keeps the rounded values here as f32, and returns the inputs
    /// with Q, K and V in f16 and the other tensors copied.
    ///
    /// Both then contain the same numbers: the returned inputs suit
    /// [`Context::attention_f16`](crate::Context::attention_f16), and these the f64 reference,
    /// which takes f32 only. Values past f16's range (±65504) become infinite.
    pub fn round_to_f16(&mut self) -> OwnedInputs<f16> {
        let round = |values: &mut Vec<f32>| {
            let rounded: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
            *values = rounded.iter().map(|x| x.to_f32()).collect();
            rounded
        };
        OwnedInputs {
            q: round(&mut self.q),
            k: round(&mut self.k),
            v: round(&mut self.v),
            mask: self.mask.clone(),
            alibi_slopes: self.alibi_slopes.clone(),
            sinks: self.sinks.clone(),
            kv_seq_lens: self.kv_seq_lens.clone(),
            cu_seqlens: self.cu_seqlens.clone(),
        }
    }
}

/// Lengths of the optional per-head and per-sequence tensors, however they are stored.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct OptionalLens {
    pub alibi_slopes: Option<usize>,
    pub sinks: Option<usize>,
    pub kv_seq_lens: Option<usize>,
    /// Lengths of `cu_seqlens_q` and `cu_seqlens_kv`; 0 for one that is missing.
    pub cu_seqlens: Option<(usize, usize)>,
}

impl OptionalLens {
    /// Checks each tensor's length (equal to what the problem needs, or at least that when not
    /// `exact`), and that offsets come exactly with packed sequences.
    pub fn check(&self, problem: &AttentionProblem, exact: bool) -> Result<()> {
        let s = &problem.shape;
        let per_head = [("alibi_slopes", self.alibi_slopes), ("sinks", self.sinks)];
        for (tensor, len) in per_head {
            if let Some(len) = len {
                check_len(tensor, len, s.heads, format!("[{}]", s.heads), exact)?;
            }
        }
        match self.kv_seq_lens {
            Some(len) => check_len("kv_seq_lens", len, s.batch, format!("[{}]", s.batch), exact)?,
            None if problem.key_lengths == KeyLengths::Cache => {
                return Err(Error::MissingKeyLengths);
            }
            None => {}
        }
        match (problem.packed, self.cu_seqlens) {
            (None, None) => Ok(()),
            (Some(_), Some((q, kv))) => {
                let offsets = format!("[{}]", s.batch + 1);
                check_len("cu_seqlens_q", q, s.batch + 1, offsets.clone(), exact)?;
                check_len("cu_seqlens_kv", kv, s.batch + 1, offsets, exact)
            }
            (Some(_), None) => Err(Error::PackedMismatch(
                "the problem has packed sequences but no cu_seqlens_q and cu_seqlens_kv were \
                 given; pass both offsets, or remove with_packed",
            )),
            (None, Some(_)) => Err(Error::PackedMismatch(
                "sequence offsets were given but the problem has no packed sequences; call \
                 AttentionProblem::with_packed with the total query and key rows",
            )),
        }
    }
}

/// Checks packed offsets: non-decreasing, no sequence over `max_len`, the last within `total`.
fn check_offsets(
    tensor: &'static str,
    offsets: &[u32],
    max_len: usize,
    total: usize,
) -> Result<()> {
    for (index, pair) in offsets.windows(2).enumerate() {
        if pair[1] < pair[0] {
            return Err(Error::InvalidLengths {
                tensor,
                index,
                value: pair[0],
                reason: format!("it is above the next offset {}", pair[1]),
                fix: "give cumulative sequence offsets, cu[b + 1] = cu[b] + the length of \
                      sequence b",
            });
        }
        let len = (pair[1] - pair[0]) as usize;
        if len > max_len {
            // The offset that ends the sequence is the one to report.
            return Err(Error::InvalidLengths {
                tensor,
                index: index + 1,
                value: pair[1],
                reason: format!(
                    "it ends sequence {index} after {len} rows, longer than the shape's \
                     longest sequence, {max_len}"
                ),
                fix: "set the shape's seq_q (for queries) or seq_kv (for keys) to the longest \
                      sequence",
            });
        }
    }
    let last = offsets.last().copied().unwrap_or(0);
    if last as usize > total {
        return Err(Error::InvalidLengths {
            tensor,
            index: offsets.len() - 1,
            value: last,
            reason: format!("it is past the {total} packed rows"),
            fix: "make the last offset the total rows, as given to with_packed",
        });
    }
    Ok(())
}

/// Checks a tensor's length: equal to `expected`, or at least `expected` when not `exact`.
/// `shape` describes the tensor for the message.
pub(crate) fn check_len(
    tensor: &'static str,
    actual: usize,
    expected: usize,
    shape: String,
    exact: bool,
) -> Result<()> {
    if actual == expected || (!exact && actual > expected) {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            tensor,
            expected,
            actual,
            shape,
        })
    }
}

/// Checks a mask's presence and length (`None` when no mask is given) against the problem.
pub(crate) fn check_mask(problem: &AttentionProblem, mask_len: Option<usize>) -> Result<()> {
    match (problem.mask_dims(), mask_len) {
        (None, None) => Ok(()),
        (Some(dims), Some(len)) => check_len(
            "mask",
            len,
            dims.iter().product(),
            format!("{dims:?}"),
            true,
        ),
        (Some(_), None) => Err(Error::MaskMismatch(
            "the problem has a mask shape but no mask tensor was given; pass the mask or \
             remove the mask shape",
        )),
        (None, Some(_)) => Err(Error::MaskMismatch(
            "a mask tensor was given but the problem has no mask shape; call \
             AttentionProblem::with_mask with its leading dimensions",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_to_f16_keeps_both_copies_equal() {
        let mut inputs = OwnedInputs {
            q: vec![0.1, -1.0 / 3.0],
            k: vec![1e5, 2.0],
            v: vec![65504.0, 1e-8],
            sinks: Some(vec![0.1]),
            kv_seq_lens: Some(vec![7]),
            ..OwnedInputs::default()
        };
        let half = inputs.round_to_f16();
        assert_eq!(half.q, [f16::from_f32(0.1), f16::from_f32(-1.0 / 3.0)]);
        for (wide, narrow) in [
            (&inputs.q, &half.q),
            (&inputs.k, &half.k),
            (&inputs.v, &half.v),
        ] {
            let widened: Vec<f32> = narrow.iter().map(|x| x.to_f32()).collect();
            assert_eq!(wide, &widened);
        }
        assert_ne!(inputs.q[0], 0.1);
        assert_eq!(inputs.k[0], f32::INFINITY);
        assert_eq!(inputs.v[0], 65504.0);
        // The optional tensors stay f32 and u32, copied unchanged.
        assert_eq!(half.sinks, Some(vec![0.1]));
        assert_eq!(half.kv_seq_lens, Some(vec![7]));
    }
}
