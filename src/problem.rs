//! The shape and options of one attention call.
//!
//! [`AttentionProblem`] is the single source of tensor sizes, index strides, FLOP and byte counts
//! for the kernels, the CPU reference, the checks and the benchmarks.

use crate::error::{Error, Result};

/// The largest head dimension the kernels accept, for queries and keys and for values.
///
/// The kernels loop over the head dimension in tiles or chunks, so this is no hardware limit: it
/// bounds the per-thread output registers of the fused kernels and the range that is tested. It
/// covers the 576/512 heads of multi-head latent attention.
pub const MAX_HEAD_DIM: usize = 576;

/// Tensor sizes of multi-head attention, whose dense layout is `[batch, heads, seq, head_dim]`.
///
/// Query head `h` reads key/value head `h / (heads / kv_heads)`, so consecutive query heads share
/// a key/value head: `kv_heads == heads` is multi-head attention, `1 < kv_heads < heads` is
/// grouped-query attention and `kv_heads == 1` is multi-query attention.
///
/// With packed sequences ([`AttentionProblem::with_packed`]), `seq_q` and `seq_kv` are the
/// longest query and key sequence of the batch.
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
    /// Head dimension of queries and keys, at most [`MAX_HEAD_DIM`].
    pub head_dim: usize,
    /// Head dimension of values and of the output, at most [`MAX_HEAD_DIM`]; equal to
    /// `head_dim` unless set with [`AttentionShape::with_head_dim_v`].
    pub head_dim_v: usize,
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
            head_dim_v: head_dim,
        }
    }

    /// Sets the head dimension of values and of the output, as in multi-head latent attention
    /// (keys of 576, values of 512) or in models with 192/128 heads.
    pub fn with_head_dim_v(mut self, head_dim_v: usize) -> Self {
        self.head_dim_v = head_dim_v;
        self
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

    /// Dense shape of `q`: `[batch, heads, seq_q, head_dim]`.
    pub fn q_dims(&self) -> [usize; 4] {
        [self.batch, self.heads, self.seq_q, self.head_dim]
    }

    /// Dense shape of `k`: `[batch, kv_heads, seq_kv, head_dim]`.
    pub fn k_dims(&self) -> [usize; 4] {
        [self.batch, self.kv_heads, self.seq_kv, self.head_dim]
    }

    /// Dense shape of `v`: `[batch, kv_heads, seq_kv, head_dim_v]`.
    pub fn v_dims(&self) -> [usize; 4] {
        [self.batch, self.kv_heads, self.seq_kv, self.head_dim_v]
    }

    /// Dense shape of the output: `[batch, heads, seq_q, head_dim_v]`.
    pub fn out_dims(&self) -> [usize; 4] {
        [self.batch, self.heads, self.seq_q, self.head_dim_v]
    }

    /// Elements of a dense `q`.
    pub fn q_len(&self) -> usize {
        self.q_dims().iter().product()
    }

    /// Elements of a dense `k`.
    pub fn k_len(&self) -> usize {
        self.k_dims().iter().product()
    }

    /// Elements of a dense `v`.
    pub fn v_len(&self) -> usize {
        self.v_dims().iter().product()
    }

    /// Elements of a dense output.
    pub fn out_len(&self) -> usize {
        self.out_dims().iter().product()
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
            ("head_dim_v", self.head_dim_v),
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
        for (name, head_dim) in [("head_dim", self.head_dim), ("head_dim_v", self.head_dim_v)] {
            if head_dim > MAX_HEAD_DIM {
                return Err(Error::HeadDimTooLarge {
                    name,
                    head_dim,
                    max: MAX_HEAD_DIM,
                });
            }
        }
        // Every later size is a product of these; checking the largest once keeps them in range.
        let score_elements = [self.batch, self.heads, self.seq_q, self.seq_kv]
            .iter()
            .try_fold(1usize, |product, &dim| product.checked_mul(dim));
        let tensor_elements = [self.batch, self.heads.max(self.kv_heads)]
            .iter()
            .chain(&[self.seq_q.max(self.seq_kv), MAX_HEAD_DIM])
            .try_fold(1usize, |product, &dim| product.checked_mul(dim));
        if score_elements.is_none() || tensor_elements.is_none() {
            return Err(Error::SizeOverflow {
                what: format!("the shape {self:?}"),
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

    /// Parses a name returned by [`Dtype::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        [Dtype::F32, Dtype::F16]
            .into_iter()
            .find(|dtype| dtype.name() == name)
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
    /// Memory layout of Q, K, V and the output.
    pub layout: Layout,
    /// Packed variable-length sequences, when the batch stores no padding.
    pub packed: Option<Packed>,
    /// The meaning of key lengths, when the inputs give them, for the diagonals.
    pub key_lengths: KeyLengths,
}

/// The meaning of key lengths (`kv_seq_lens`) for the causal, window and ALiBi diagonals.
///
/// Without key lengths both are the same attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KeyLengths {
    /// Keys past each length are padding and masked. The diagonals stay placed by `seq_kv` (by
    /// the sequence's own keys when packed). This fits a batch padded on the right, whose
    /// queries are padded alike. Over a key/value cache allocated for `seq_kv` keys it places a
    /// bottom-right causal diagonal past the filled keys, so every query row of a prefill
    /// attends to all of them: use [`KeyLengths::Cache`] there.
    #[default]
    Padding,
    /// Each length is the filled part of a key/value cache and places the diagonals: the
    /// `seq_q` query rows are the last `seq_q` positions of the filled part, so row `i` has its
    /// diagonal at key `i + length - seq_q`. FlashAttention's `cache_seqlens` mean the same.
    /// This fits decoding and chunked prefill over a cache allocated for `seq_kv` keys.
    Cache,
}

/// Element strides of one tensor over batch, head and sequence position; the head dim is
/// contiguous (stride 1).
///
/// With packed sequences the position is the row in the packed tensor, `cu_seqlens[b] + i`, and
/// `batch` is usually 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Strides {
    /// Elements between batch elements.
    pub batch: usize,
    /// Elements between heads.
    pub head: usize,
    /// Elements between sequence positions.
    pub seq: usize,
}

impl Strides {
    /// Element offset of row `row` of head `h` in batch element `b`.
    pub fn offset(&self, b: usize, h: usize, row: usize) -> usize {
        b * self.batch + h * self.head + row * self.seq
    }

    /// Elements from the first to one past the last element of a tensor with these strides.
    /// Returns `None` when the count overflows `usize`.
    fn span(&self, batch: usize, heads: usize, rows: usize, dim: usize) -> Option<usize> {
        if batch == 0 || heads == 0 || rows == 0 || dim == 0 {
            return Some(0);
        }
        let steps = [
            (batch - 1, self.batch),
            (heads - 1, self.head),
            (rows - 1, self.seq),
        ];
        steps.iter().try_fold(dim, |total, &(count, stride)| {
            total.checked_add(count.checked_mul(stride)?)
        })
    }

    /// Returns whether every (batch, head, row, column) has an element of its own.
    fn is_one_to_one(&self, batch: usize, heads: usize, rows: usize, dim: usize) -> bool {
        // Sorted by stride, each dimension must step past everything the smaller ones cover.
        let mut dims = [
            (1, dim),
            (self.seq, rows),
            (self.head, heads),
            (self.batch, batch),
        ];
        dims.sort_unstable();
        let mut covered = 0;
        for (stride, extent) in dims {
            if extent <= 1 {
                continue;
            }
            if stride <= covered {
                return false;
            }
            covered += stride * (extent - 1);
        }
        true
    }
}

/// Strides of Q, K, V and the output, for [`Layout::Strided`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TensorStrides {
    /// Strides of `q`.
    pub q: Strides,
    /// Strides of `k`.
    pub k: Strides,
    /// Strides of `v`.
    pub v: Strides,
    /// Strides of the output.
    pub out: Strides,
}

/// Memory layout of Q, K, V and the output, which the kernels read and write in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `[batch, heads, seq, head_dim]`, contiguous; with packed sequences
    /// `[heads, total, head_dim]`.
    #[default]
    Bhsd,
    /// `[batch, seq, heads, head_dim]`, contiguous, as most model code produces it; with packed
    /// sequences `[total, heads, head_dim]`, FlashAttention's variable-length layout.
    Bshd,
    /// Any strides, such as views into a fused QKV projection. Each tensor may then be longer
    /// than the elements it addresses.
    Strided(TensorStrides),
}

/// Packed variable-length sequences: batch element `b` owns query rows
/// `cu_seqlens_q[b]..cu_seqlens_q[b + 1]` and key rows `cu_seqlens_kv[b]..cu_seqlens_kv[b + 1]`
/// of tensors that store no padding.
///
/// Each sequence has its own lengths, which place its causal and window diagonal; the shape's
/// `seq_q` and `seq_kv` are the longest lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Packed {
    /// Query rows of all sequences together: the rows of `q` and the output.
    pub total_q: usize,
    /// Key rows of all sequences together: the rows of `k` and `v`.
    pub total_kv: usize,
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
            layout: Layout::Bhsd,
            packed: None,
            key_lengths: KeyLengths::Padding,
        }
    }

    /// Sets what key lengths mean for the causal, window and ALiBi diagonals:
    /// [`KeyLengths::Cache`] for a key/value cache.
    pub fn with_key_lengths(mut self, key_lengths: KeyLengths) -> Self {
        self.key_lengths = key_lengths;
        self
    }

    /// Sets how Q, K, V and the output lie in memory.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Declares packed variable-length sequences of `total_q` query rows and `total_kv` key
    /// rows in all; the offsets come with the inputs as `cu_seqlens_q` and `cu_seqlens_kv`.
    pub fn with_packed(mut self, total_q: usize, total_kv: usize) -> Self {
        self.packed = Some(Packed { total_q, total_kv });
        self
    }

    /// Rows of Q and the output per head: `seq_q`, or `total_q` with packed sequences.
    pub fn q_rows(&self) -> usize {
        self.packed.map_or(self.shape.seq_q, |p| p.total_q)
    }

    /// Rows of K and V per head: `seq_kv`, or `total_kv` with packed sequences.
    pub fn kv_rows(&self) -> usize {
        self.packed.map_or(self.shape.seq_kv, |p| p.total_kv)
    }

    /// Returns the strides in effect for Q, K, V and the output.
    pub fn strides(&self) -> TensorStrides {
        let s = &self.shape;
        let (q_rows, kv_rows) = (self.q_rows(), self.kv_rows());
        // Packed tensors have no batch dimension: every sequence's rows follow one another.
        let packed = self.packed.is_some();
        let contiguous = |heads: usize, rows: usize, dim: usize, bshd: bool| {
            let batch = if packed { 0 } else { heads * rows * dim };
            if bshd {
                Strides {
                    batch,
                    head: dim,
                    seq: heads * dim,
                }
            } else {
                Strides {
                    batch,
                    head: rows * dim,
                    seq: dim,
                }
            }
        };
        let named = |bshd| TensorStrides {
            q: contiguous(s.heads, q_rows, s.head_dim, bshd),
            k: contiguous(s.kv_heads, kv_rows, s.head_dim, bshd),
            v: contiguous(s.kv_heads, kv_rows, s.head_dim_v, bshd),
            out: contiguous(s.heads, q_rows, s.head_dim_v, bshd),
        };
        match self.layout {
            Layout::Bhsd => named(false),
            Layout::Bshd => named(true),
            Layout::Strided(strides) => strides,
        }
    }

    /// Elements each of Q, K, V and the output must have: the span their strides address.
    /// A span that overflows `usize` reads as `usize::MAX`; [`AttentionProblem::validate`]
    /// rejects such problems.
    pub fn spans(&self) -> [usize; 4] {
        self.checked_spans().map(|span| span.unwrap_or(usize::MAX))
    }

    fn checked_spans(&self) -> [Option<usize>; 4] {
        let s = &self.shape;
        let t = self.strides();
        let (q_rows, kv_rows) = (self.q_rows(), self.kv_rows());
        [
            t.q.span(s.batch, s.heads, q_rows, s.head_dim),
            t.k.span(s.batch, s.kv_heads, kv_rows, s.head_dim),
            t.v.span(s.batch, s.kv_heads, kv_rows, s.head_dim_v),
            t.out.span(s.batch, s.heads, q_rows, s.head_dim_v),
        ]
    }

    /// Shapes of Q, K, V and the output as their layout stores them, for messages: dims in
    /// memory order, or the strides over `[batch, heads, rows, dim]`.
    pub fn layout_shapes(&self) -> [String; 4] {
        let s = &self.shape;
        let (q_rows, kv_rows) = (self.q_rows(), self.kv_rows());
        let tensors = [
            (s.heads, q_rows, s.head_dim),
            (s.kv_heads, kv_rows, s.head_dim),
            (s.kv_heads, kv_rows, s.head_dim_v),
            (s.heads, q_rows, s.head_dim_v),
        ];
        let strides = self.strides();
        let all = [strides.q, strides.k, strides.v, strides.out];
        let packed = self.packed.is_some();
        std::array::from_fn(|t| {
            let (heads, rows, dim) = tensors[t];
            let dims: Vec<usize> = match (self.layout, packed) {
                (Layout::Bhsd, false) => vec![s.batch, heads, rows, dim],
                (Layout::Bshd, false) => vec![s.batch, rows, heads, dim],
                (Layout::Bhsd, true) => vec![heads, rows, dim],
                (Layout::Bshd, true) => vec![rows, heads, dim],
                (Layout::Strided(_), _) => {
                    return format!("{:?} over [{}, {heads}, {rows}, {dim}]", all[t], s.batch);
                }
            };
            format!("{dims:?}")
        })
    }

    /// Elements of the log-sum-exp output: `[batch, heads, seq_q]`, or `[heads, total_q]` with
    /// packed sequences.
    pub fn lse_len(&self) -> usize {
        match self.packed {
            None => self.shape.lse_len(),
            Some(packed) => self.shape.heads * packed.total_q,
        }
    }

    /// Element strides of the log-sum-exp over batch and head; positions are contiguous.
    pub fn lse_strides(&self) -> (usize, usize) {
        match self.packed {
            None => (self.shape.heads * self.shape.seq_q, self.shape.seq_q),
            Some(packed) => (0, packed.total_q),
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
        // The kernels take both values as f32: a scale past f32's range would make every score
        // infinite, and a soft-cap that rounds to infinity, zero or a subnormal would make the
        // capped scores NaN or lose their precision.
        if let Some(scale) = self.scale
            && !(scale as f32).is_finite()
        {
            return Err(Error::InvalidScale { scale });
        }
        if let Some(softcap) = self.softcap
            && !(softcap > 0.0 && (softcap as f32).is_normal())
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
        if let Some(packed) = self.packed {
            for (name, value) in [("total_q", packed.total_q), ("total_kv", packed.total_kv)] {
                if value == 0 {
                    return Err(Error::ZeroDimension { name });
                }
            }
        }
        for (tensor, span) in ["q", "k", "v", "out"].iter().zip(self.checked_spans()) {
            if span.is_none() {
                return Err(Error::SizeOverflow {
                    what: format!("tensor `{tensor}` with strides {:?}", self.strides()),
                });
            }
        }
        let out = self.strides().out;
        // Packed sequences share the rows of one batch-free tensor; the offsets keep them apart.
        let out_batch = if self.packed.is_some() && out.batch == 0 {
            1
        } else {
            self.shape.batch
        };
        if !out.is_one_to_one(
            out_batch,
            self.shape.heads,
            self.q_rows(),
            self.shape.head_dim_v,
        ) {
            return Err(Error::OverlappingStrides {
                tensor: "out",
                strides: format!("{out:?}"),
            });
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

    /// Whether query `i` may attend to key `j` under the causal mask alone, for a batch of
    /// dense sequences.
    pub fn causal_allows(&self, i: usize, j: usize) -> bool {
        self.causal
            .last_key(i, self.shape.seq_q, self.shape.seq_kv)
            .is_some_and(|last| j <= last)
    }

    /// Whether query `i` may attend to key `j` under the causal mask and the sliding window, for
    /// a batch of dense sequences with no key lengths.
    pub fn allows(&self, i: usize, j: usize) -> bool {
        self.allows_in(&Sequence::dense(&self.shape), i, j)
    }

    /// Returns whether query `i` of `sequence` may attend to key `j`: the key exists, and the causal
    /// mask and the sliding window, placed by the sequence's own lengths, allow it.
    pub fn allows_in(&self, sequence: &Sequence, i: usize, j: usize) -> bool {
        if j >= sequence.key_limit {
            return false;
        }
        let causal_ok = self
            .causal
            .last_key(i, sequence.rows, sequence.anchor)
            .is_some_and(|last| j <= last);
        let diagonal = sequence.diagonal(i);
        let j = j as i64;
        let left_ok = self
            .window
            .left
            .is_none_or(|left| j >= diagonal - left as i64);
        let right_ok = self
            .window
            .right
            .is_none_or(|right| j <= diagonal + right as i64);
        causal_ok && left_ok && right_ok
    }

    /// Applies soft-capping, when set, to a scaled score.
    pub fn cap(&self, score: f64) -> f64 {
        match self.softcap {
            Some(softcap) => softcap * (score / softcap).tanh(),
            None => score,
        }
    }

    /// Floating-point operations of the attention: `2 · (head_dim + head_dim_v)` for each
    /// (query, key) pair that the causal mask leaves, over `B · H` heads. Without a causal mask
    /// that is `4 · B · H · Sq · Skv · D` when the head dims agree, and with one on a square
    /// problem about half of it. Packed sequences count at the longest lengths, and the window
    /// and key lengths are not counted.
    ///
    /// This is the convention FlashAttention's benchmarks use; it ignores the softmax.
    pub fn flops(&self) -> f64 {
        let s = &self.shape;
        let dims = (s.head_dim + s.head_dim_v) as f64;
        2.0 * (s.batch * s.heads) as f64 * self.causal_pairs() as f64 * dims
    }

    /// Counts the (query, key) pairs of one head that the causal mask alone leaves.
    fn causal_pairs(&self) -> u64 {
        (0..self.shape.seq_q)
            .map(|i| self.causal_keys(i) as u64)
            .sum()
    }

    /// Counts the keys that query `i` may attend to under the causal mask alone.
    fn causal_keys(&self, i: usize) -> usize {
        let (seq_q, seq_kv) = (self.shape.seq_q, self.shape.seq_kv);
        self.causal
            .last_key(i, seq_q, seq_kv)
            .map_or(0, |last| last.saturating_add(1).min(seq_kv))
    }

    /// Bytes of Q, the mask and the output in memory, and of the K and V rows that some query
    /// may attend to under the causal mask: the least memory traffic of one call. As in
    /// [`AttentionProblem::flops`], packed sequences count at the longest lengths, and the window
    /// and key lengths are not counted.
    pub fn io_bytes(&self) -> u64 {
        let s = &self.shape;
        // `last_key` grows with the query index, so the last query may attend to the most keys.
        let keys_read = s
            .seq_q
            .checked_sub(1)
            .map_or(0, |last_query| self.causal_keys(last_query));
        // K and V hold seq_kv rows each, so the division is exact.
        let kv_len = (s.k_len() + s.v_len()) / s.seq_kv.max(1) * keys_read;
        let tensors = (s.q_len() + s.out_len() + kv_len) * self.dtype.bytes();
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
        if self.key_lengths == KeyLengths::Cache {
            label.push_str("_lens-cache");
        }
        if s.head_dim_v != s.head_dim {
            label.push_str(&format!("_dv{}", s.head_dim_v));
        }
        if let Some(m) = self.mask {
            label.push_str(&format!("_mask{}x{}", m.batch, m.heads));
        }
        if let Some(packed) = self.packed {
            label.push_str(&format!("_packed{}x{}", packed.total_q, packed.total_kv));
        }
        match self.layout {
            Layout::Bhsd => {}
            Layout::Bshd => label.push_str("_bshd"),
            Layout::Strided(_) => label.push_str("_strided"),
        }
        if self.dtype == Dtype::F16 {
            label.push_str("_f16");
        }
        label
    }
}

/// One batch element's sequence: its lengths and where its rows start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sequence {
    /// Query rows; `seq_q` unless the sequences are packed.
    pub rows: usize,
    /// Keys stored for the sequence; `seq_kv` unless the sequences are packed.
    pub keys: usize,
    /// Keys below this index may be attended: `keys`, or the sequence's key length when given
    /// and smaller.
    pub key_limit: usize,
    /// Keys that place the bottom-right diagonal: `keys`, or `key_limit` with
    /// [`KeyLengths::Cache`].
    pub anchor: usize,
    /// The first row of the sequence in Q and the output; 0 unless packed.
    pub row_begin: usize,
    /// The first row of the sequence in K and V; 0 unless packed.
    pub key_begin: usize,
}

impl Sequence {
    /// Returns a dense sequence of the shape's lengths.
    pub fn dense(shape: &AttentionShape) -> Self {
        Self {
            rows: shape.seq_q,
            keys: shape.seq_kv,
            key_limit: shape.seq_kv,
            anchor: shape.seq_kv,
            row_begin: 0,
            key_begin: 0,
        }
    }

    /// Returns the bottom-right diagonal of row `i`: key `i + anchor - rows`, which may be
    /// negative.
    pub fn diagonal(&self, i: usize) -> i64 {
        i as i64 + self.anchor as i64 - self.rows as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn causal(shape: AttentionShape, causal: Causal) -> AttentionProblem {
        AttentionProblem::new(shape).with_causal(causal)
    }

    #[test]
    fn flops_count_pairs_the_causal_mask_leaves() {
        let square = AttentionShape::new(1, 2, 4, 4, 8);
        // 4 · B · H · Sq · Skv · D without a mask, and 1 + 2 + 3 + 4 of the 16 pairs with one.
        assert_eq!(causal(square, Causal::None).flops(), 4.0 * 2.0 * 16.0 * 8.0);
        assert_eq!(
            causal(square, Causal::TopLeft).flops(),
            4.0 * 2.0 * 10.0 * 8.0
        );
        assert_eq!(
            causal(square, Causal::BottomRight).flops(),
            4.0 * 2.0 * 10.0 * 8.0
        );

        let decode = AttentionShape::new(1, 1, 1, 4096, 64);
        assert_eq!(causal(decode, Causal::TopLeft).flops(), 4.0 * 64.0);
        assert_eq!(
            causal(decode, Causal::BottomRight).flops(),
            causal(decode, Causal::None).flops()
        );

        // Top-left rows past the keys attend to all of them: 1 + 2 + 2.
        let tall = AttentionShape::new(1, 1, 3, 2, 16);
        assert_eq!(causal(tall, Causal::TopLeft).flops(), 4.0 * 5.0 * 16.0);
        // Bottom-right, the first row attends to no key: 0 + 1 + 2.
        assert_eq!(causal(tall, Causal::BottomRight).flops(), 4.0 * 3.0 * 16.0);
    }

    #[test]
    fn io_bytes_count_keys_some_query_reads() {
        let decode = AttentionShape::new(1, 2, 1, 4096, 64);
        let q_and_out = 2 * 2 * 64 * 4;
        let one_key = 2 * 2 * 64 * 4;
        assert_eq!(
            causal(decode, Causal::TopLeft).io_bytes(),
            (q_and_out + one_key) as u64
        );
        assert_eq!(
            causal(decode, Causal::BottomRight).io_bytes(),
            (q_and_out + 4096 * one_key) as u64
        );
        assert_eq!(
            causal(decode, Causal::None).io_bytes(),
            (q_and_out + 4096 * one_key) as u64
        );
    }
}
