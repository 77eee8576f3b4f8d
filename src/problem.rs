//! The shape and options of one attention call.
//!
//! [`AttentionProblem`] is the single source of tensor sizes, index strides, FLOP and byte counts
//! for the kernels, the CPU reference, the checks and the benchmarks.

use crate::error::{Error, Result};

/// The largest head dimension the kernels accept.
///
/// The tiled kernels loop over the head dimension in tiles, so this is no hardware limit: it
/// bounds the per-thread output registers of the fused kernels and the range that is tested.
pub const MAX_HEAD_DIM: usize = 256;

/// Tensor sizes of multi-head attention in the layout `[batch, heads, seq, head_dim]`.
///
/// Query head `h` reads key/value head `h / (heads / kv_heads)`, so consecutive query heads share
/// a key/value head: `kv_heads == heads` is multi-head attention, `1 < kv_heads < heads` is
/// grouped-query attention and `kv_heads == 1` is multi-query attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttentionShape {
    /// Batch size `B`.
    pub batch: usize,
    /// Query heads `H`.
    pub heads: usize,
    /// Key/value heads `H_kv`; `heads` must be a multiple of it.
    pub kv_heads: usize,
    /// Query rows per head.
    pub seq_q: usize,
    /// Key/value rows per head.
    pub seq_kv: usize,
    /// Head dimension of queries, keys and values, at most [`MAX_HEAD_DIM`].
    pub head_dim: usize,
}

impl AttentionShape {
    /// Creates the shape of multi-head attention with `kv_heads == heads`.
    pub fn new(batch: usize, heads: usize, seq_q: usize, seq_kv: usize, head_dim: usize) -> Self {
        Self {
            batch,
            heads,
            kv_heads: heads,
            seq_q,
            seq_kv,
            head_dim,
        }
    }

    /// Sets the number of key/value heads for grouped-query or multi-query attention.
    pub fn with_kv_heads(mut self, kv_heads: usize) -> Self {
        self.kv_heads = kv_heads;
        self
    }

    /// Query heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        // 0 for a shape with no key/value heads, which validation rejects.
        self.heads.checked_div(self.kv_heads).unwrap_or(0)
    }

    /// Shape of `q` and of the output: `[batch, heads, seq_q, head_dim]`.
    pub fn q_dims(&self) -> [usize; 4] {
        [self.batch, self.heads, self.seq_q, self.head_dim]
    }

    /// Shape of `k` and `v`: `[batch, kv_heads, seq_kv, head_dim]`.
    pub fn kv_dims(&self) -> [usize; 4] {
        [self.batch, self.kv_heads, self.seq_kv, self.head_dim]
    }

    /// Elements of `q` and of the output.
    pub fn q_len(&self) -> usize {
        self.q_dims().iter().product()
    }

    /// Elements of `k`, and of `v`.
    pub fn kv_len(&self) -> usize {
        self.kv_dims().iter().product()
    }

    /// Elements of the log-sum-exp output: `[batch, heads, seq_q]`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.heads * self.seq_q
    }

    /// Elements of one head's score matrix, `seq_q × seq_kv`.
    pub fn scores_per_head(&self) -> usize {
        self.seq_q * self.seq_kv
    }

    fn check(&self) -> Result<()> {
        let dims = [
            ("batch", self.batch),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("seq_q", self.seq_q),
            ("seq_kv", self.seq_kv),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in dims {
            if value == 0 {
                return Err(Error::ZeroDimension { name });
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::HeadsNotDivisible {
                heads: self.heads,
                kv_heads: self.kv_heads,
            });
        }
        if self.head_dim > MAX_HEAD_DIM {
            return Err(Error::HeadDimTooLarge {
                head_dim: self.head_dim,
                max: MAX_HEAD_DIM,
            });
        }
        Ok(())
    }
}

/// Causal masking, in the two alignments used in the field.
///
/// For `seq_q = 3` and `seq_kv = 5` (`x` is attended, `.` is masked):
///
/// ```text
///   TopLeft          BottomRight
///   keys 0 1 2 3 4   keys 0 1 2 3 4
///   q0   x . . . .   q0   x x x . .
///   q1   x x . . .   q1   x x x x .
///   q2   x x x . .   q2   x x x x x
/// ```
///
/// `TopLeft` lets query `i` see keys `0..=i`, as PyTorch's
/// `scaled_dot_product_attention(is_causal=True)` does. `BottomRight` lets query `i` see keys
/// `0..=i + seq_kv - seq_q`, so the last query sees every key: this is what decoding with a
/// key/value cache needs, and what FlashAttention uses from version 2.1 on. The two agree when
/// `seq_q == seq_kv`. With `BottomRight` and `seq_q > seq_kv` the first `seq_q - seq_kv` rows see
/// no key at all and their output is 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Causal {
    /// No causal mask.
    #[default]
    None,
    /// Query `i` attends to keys `j <= i`.
    TopLeft,
    /// Query `i` attends to keys `j <= i + seq_kv - seq_q`.
    BottomRight,
}

impl Causal {
    /// The last key index that query `i` may attend to, or `None` when it may attend to none.
    /// Returns `Some(usize::MAX)` for [`Causal::None`].
    pub fn last_key(self, i: usize, seq_q: usize, seq_kv: usize) -> Option<usize> {
        match self {
            Causal::None => Some(usize::MAX),
            Causal::TopLeft => Some(i),
            Causal::BottomRight => (i + seq_kv).checked_sub(seq_q),
        }
    }

    /// The name used in fixture metadata and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Causal::None => "none",
            Causal::TopLeft => "top_left",
            Causal::BottomRight => "bottom_right",
        }
    }

    /// Parses a name written by [`Causal::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Causal::None),
            "top_left" => Some(Causal::TopLeft),
            "bottom_right" => Some(Causal::BottomRight),
            _ => None,
        }
    }

    /// Index of the variant in the shaders' `causal` parameter.
    pub(crate) fn code(self) -> u32 {
        match self {
            Causal::None => 0,
            Causal::TopLeft => 1,
            Causal::BottomRight => 2,
        }
    }
}

/// Leading dimensions of an additive mask of shape `[batch, heads, seq_q, seq_kv]`.
///
/// A dimension of 1 broadcasts over the problem's batch or query heads. The mask is added to the
/// scaled scores, so `0` keeps an entry and `-inf` removes it; any other value biases it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaskShape {
    /// 1 or the problem's batch.
    pub batch: usize,
    /// 1 or the problem's query heads.
    pub heads: usize,
}

/// Element type of Q, K, V and the output in GPU memory. Arithmetic is f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 32-bit floats.
    #[default]
    F32,
    /// 16-bit floats; needs a device with `wgpu::Features::SHADER_F16` for GPU buffers.
    F16,
}

impl Dtype {
    /// Returns the bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
        }
    }

    /// Returns the name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
        }
    }
}

/// The shape and options of one attention call:
/// `out = softmax(scale · Q Kᵀ + mask, causal) · V`, per batch element and query head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionProblem {
    /// Tensor sizes.
    pub shape: AttentionShape,
    /// Softmax scale; `None` means `1 / sqrt(head_dim)`.
    pub scale: Option<f64>,
    /// Causal masking.
    pub causal: Causal,
    /// Shape of the additive mask, if one is given.
    pub mask: Option<MaskShape>,
    /// Element type of Q, K, V and the output in GPU memory; the mask and log-sum-exp are f32.
    pub dtype: Dtype,
    /// Logit soft-capping: each scaled score `s` becomes `softcap · tanh(s / softcap)` before
    /// the mask is added.
    pub softcap: Option<f64>,
    /// Sliding-window attention: query `i` sees keys `j` with
    /// `i + seq_kv - seq_q - left <= j <= i + seq_kv - seq_q + right`, each side unbounded when
    /// `None`. The window's diagonal is aligned bottom-right, as FlashAttention places it, and
    /// combines with the causal mask and the additive mask.
    pub window: Window,
}

/// Sliding-window bounds, in keys to the left and right of a query's bottom-right diagonal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Window {
    /// Keys before the diagonal a query sees; `None` is unbounded.
    pub left: Option<usize>,
    /// Keys after the diagonal a query sees; `None` is unbounded.
    pub right: Option<usize>,
}

impl AttentionProblem {
    /// Creates a problem with the default scale, no causal mask and no additive mask.
    pub fn new(shape: AttentionShape) -> Self {
        Self {
            shape,
            scale: None,
            causal: Causal::None,
            mask: None,
            dtype: Dtype::F32,
            softcap: None,
            window: Window::default(),
        }
    }

    /// Sets the softmax scale.
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Sets the element type of Q, K, V and the output in GPU memory.
    pub fn with_dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// Sets logit soft-capping: scores become `softcap · tanh(score / softcap)`.
    pub fn with_softcap(mut self, softcap: f64) -> Self {
        self.softcap = Some(softcap);
        self
    }

    /// Sets a sliding window of `left` keys before and `right` keys after each query's
    /// bottom-right diagonal; `None` leaves a side unbounded.
    pub fn with_window(mut self, left: Option<usize>, right: Option<usize>) -> Self {
        self.window = Window { left, right };
        self
    }

    /// Sets causal masking.
    pub fn with_causal(mut self, causal: Causal) -> Self {
        self.causal = causal;
        self
    }

    /// Adds an additive mask of shape `[mask_batch, mask_heads, seq_q, seq_kv]`, where each of
    /// `mask_batch` and `mask_heads` is 1 (broadcast) or the problem's own size.
    pub fn with_mask(mut self, mask_batch: usize, mask_heads: usize) -> Self {
        self.mask = Some(MaskShape {
            batch: mask_batch,
            heads: mask_heads,
        });
        self
    }

    /// The scale in effect: the given one, or `1 / sqrt(head_dim)`.
    pub fn scale(&self) -> f64 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.shape.head_dim as f64).sqrt())
    }

    /// Checks every dimension and option, returning the first problem found.
    pub fn validate(&self) -> Result<()> {
        self.shape.check()?;
        if let Some(scale) = self.scale
            && !scale.is_finite()
        {
            return Err(Error::InvalidScale { scale });
        }
        if let Some(softcap) = self.softcap
            && !(softcap.is_finite() && softcap > 0.0)
        {
            return Err(Error::InvalidSoftcap { softcap });
        }
        for (side, value) in [("left", self.window.left), ("right", self.window.right)] {
            if let Some(value) = value
                && value > i32::MAX as usize
            {
                return Err(Error::InvalidWindow { side, value });
            }
        }
        if let Some(mask) = self.mask {
            let batch_ok = mask.batch == 1 || mask.batch == self.shape.batch;
            let heads_ok = mask.heads == 1 || mask.heads == self.shape.heads;
            if !batch_ok || !heads_ok {
                return Err(Error::MaskShape {
                    mask_batch: mask.batch,
                    mask_heads: mask.heads,
                    batch: self.shape.batch,
                    heads: self.shape.heads,
                });
            }
        }
        Ok(())
    }

    /// Shape of the mask tensor, if there is one.
    pub fn mask_dims(&self) -> Option<[usize; 4]> {
        self.mask
            .map(|m| [m.batch, m.heads, self.shape.seq_q, self.shape.seq_kv])
    }

    /// Elements of the mask tensor (0 without a mask).
    pub fn mask_len(&self) -> usize {
        self.mask_dims().map_or(0, |d| d.iter().product())
    }

    /// Element strides of the mask over batch and heads; a broadcast dimension has stride 0.
    pub fn mask_strides(&self) -> (usize, usize) {
        match self.mask {
            None => (0, 0),
            Some(m) => {
                let per_head = self.shape.scores_per_head();
                let head_stride = if m.heads == 1 { 0 } else { per_head };
                let batch_stride = if m.batch == 1 { 0 } else { m.heads * per_head };
                (batch_stride, head_stride)
            }
        }
    }

    /// Whether query `i` may attend to key `j` under the causal mask alone.
    pub fn causal_allows(&self, i: usize, j: usize) -> bool {
        self.causal
            .last_key(i, self.shape.seq_q, self.shape.seq_kv)
            .is_some_and(|last| j <= last)
    }

    /// Whether query `i` may attend to key `j` under the causal mask and the sliding window.
    pub fn allows(&self, i: usize, j: usize) -> bool {
        // The bottom-right diagonal of row i is key i + seq_kv - seq_q, which may be negative.
        let diagonal = i as i64 + self.shape.seq_kv as i64 - self.shape.seq_q as i64;
        let j = j as i64;
        let left_ok = self
            .window
            .left
            .is_none_or(|left| j >= diagonal - left as i64);
        let right_ok = self
            .window
            .right
            .is_none_or(|right| j <= diagonal + right as i64);
        self.causal_allows(i, j as usize) && left_ok && right_ok
    }

    /// Applies soft-capping, when set, to a scaled score.
    pub fn cap(&self, score: f64) -> f64 {
        match self.softcap {
            Some(softcap) => softcap * (score / softcap).tanh(),
            None => score,
        }
    }

    /// Floating-point operations of the attention, counted as `4 · B · H · Sq · Skv · D`
    /// (two matrix products of `2 · Sq · Skv · D` each), halved for causal masking.
    ///
    /// This is the convention FlashAttention's benchmarks use; it ignores the softmax.
    pub fn flops(&self) -> f64 {
        let s = &self.shape;
        let full =
            4.0 * (s.batch * s.heads) as f64 * s.seq_q as f64 * s.seq_kv as f64 * s.head_dim as f64;
        if self.causal == Causal::None {
            full
        } else {
            full / 2.0
        }
    }

    /// Bytes of Q, K, V, the mask and the output in memory: the least memory traffic of one
    /// call.
    pub fn io_bytes(&self) -> u64 {
        let s = &self.shape;
        let tensors = (2 * s.q_len() + 2 * s.kv_len()) * self.dtype.bytes();
        (tensors + 4 * self.mask_len()) as u64
    }

    /// Returns a short name for benchmarks and reports, such as
    /// `b1_h8_hkv8_q1024_kv1024_d64_causal-tl`.
    pub fn label(&self) -> String {
        let s = &self.shape;
        let mut label = format!(
            "b{}_h{}_hkv{}_q{}_kv{}_d{}",
            s.batch, s.heads, s.kv_heads, s.seq_q, s.seq_kv, s.head_dim
        );
        match self.causal {
            Causal::None => {}
            Causal::TopLeft => label.push_str("_causal-tl"),
            Causal::BottomRight => label.push_str("_causal-br"),
        }
        if let Some(m) = self.mask {
            label.push_str(&format!("_mask{}x{}", m.batch, m.heads));
        }
        if self.dtype == Dtype::F16 {
            label.push_str("_f16");
        }
        label
    }
}

/// Host-side inputs of one attention call, each contiguous in the layout of [`AttentionShape`].
#[derive(Clone, Copy, Debug)]
pub struct AttentionInputs<'a> {
    /// Queries, `[batch, heads, seq_q, head_dim]`.
    pub q: &'a [f32],
    /// Keys, `[batch, kv_heads, seq_kv, head_dim]`.
    pub k: &'a [f32],
    /// Values, `[batch, kv_heads, seq_kv, head_dim]`.
    pub v: &'a [f32],
    /// Additive mask, `[mask_batch, mask_heads, seq_q, seq_kv]`, when the problem has one.
    pub mask: Option<&'a [f32]>,
}

impl AttentionInputs<'_> {
    /// Checks every slice length against the problem.
    pub fn validate(&self, problem: &AttentionProblem) -> Result<()> {
        let s = &problem.shape;
        check_len("q", self.q.len(), &s.q_dims())?;
        check_len("k", self.k.len(), &s.kv_dims())?;
        check_len("v", self.v.len(), &s.kv_dims())?;
        check_mask(problem, self.mask.map(<[f32]>::len))
    }
}

pub(crate) fn check_len(tensor: &'static str, actual: usize, dims: &[usize]) -> Result<()> {
    let expected = dims.iter().product();
    if actual == expected {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            tensor,
            expected,
            actual,
            shape: format!("{dims:?}"),
        })
    }
}

/// Checks a mask's presence and length (`None` when no mask is given) against the problem.
pub(crate) fn check_mask(problem: &AttentionProblem, mask_len: Option<usize>) -> Result<()> {
    match (problem.mask_dims(), mask_len) {
        (None, None) => Ok(()),
        (Some(dims), Some(len)) => check_len("mask", len, &dims),
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
