//! The crate's error type.

/// How an adapter is requested through [`crate::Context::new`] or `--adapter`.
const ADAPTER_HINT: &str = "request a part of an adapter name or a backend (vulkan, metal, dx12, \
     gl), in `Context::with_adapter`, WGPU_ATTENTION_ADAPTER or the tool's --adapter; the tool's \
     `wgpu-attention info` lists the adapters";

/// How to get an adapter on a machine without a GPU.
pub const INSTALL_HINT: &str = "install a Vulkan driver: on a machine without a GPU, Mesa's \
     lavapipe runs Vulkan on the CPU (Debian and Ubuntu: `apt-get install mesa-vulkan-drivers`; \
     Fedora: `dnf install mesa-vulkan-drivers`)";

/// Everything that can go wrong in this crate.
///
/// Each message names the offending value and says what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A dimension of the problem is zero.
    #[error("dimension `{name}` is 0; every dimension of an attention problem must be at least 1")]
    ZeroDimension {
        /// The dimension's name, as in [`crate::AttentionShape`].
        name: &'static str,
    },

    /// The number of query heads is not a multiple of the number of key/value heads.
    #[error(
        "heads = {heads} is not a multiple of kv_heads = {kv_heads}; grouped-query attention \
         needs each key/value head shared by the same number of query heads, so set kv_heads \
         to one of {}",
        divisors(*.heads)
    )]
    HeadsNotDivisible {
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
    },

    /// A head dimension is larger than the kernels support.
    #[error(
        "{name} = {head_dim} is larger than the supported maximum of {max}; no kernel takes \
         longer heads, so {name} must be at most {max}"
    )]
    HeadDimTooLarge {
        /// The head dimension's name: `head_dim` or `head_dim_v`.
        name: &'static str,
        /// Requested head dimension.
        head_dim: usize,
        /// Largest supported head dimension.
        max: usize,
    },

    /// The softmax scale is NaN, or infinite once rounded to the kernels' f32.
    #[error(
        "scale = {scale} is not a finite f32, which the kernels compute in; pass a scale of \
         magnitude at most 3.4e38, or leave it unset for 1/sqrt(head_dim)"
    )]
    InvalidScale {
        /// The rejected scale.
        scale: f64,
    },

    /// The soft-capping value is not a positive number within the range of a normal f32.
    #[error(
        "softcap = {softcap} is invalid; pass a value from 1.2e-38 to 3.4e38 (a positive normal \
         f32, which the kernels compute in), or none for no capping"
    )]
    InvalidSoftcap {
        /// The rejected value.
        softcap: f64,
    },

    /// A sliding-window bound is larger than the kernels' signed 32-bit positions.
    #[error("window_{side} = {value} exceeds {max}; pass None for an unbounded side", max = i32::MAX)]
    InvalidWindow {
        /// `left` or `right`.
        side: &'static str,
        /// The rejected bound.
        value: usize,
    },

    /// The additive mask does not broadcast to `[batch, heads, seq_q, seq_kv]`.
    #[error(
        "mask shape [{mask_batch}, {mask_heads}, seq_q, seq_kv] does not broadcast to \
         [batch = {batch}, heads = {heads}, seq_q, seq_kv]; give the mask's batch and heads \
         either 1 (broadcast) or the problem's own size"
    )]
    MaskShape {
        /// Mask batch dimension.
        mask_batch: usize,
        /// Mask head dimension.
        mask_heads: usize,
        /// Problem batch.
        batch: usize,
        /// Problem query heads.
        heads: usize,
    },

    /// A host slice, or the GPU buffer of a per-head or per-sequence tensor, contains the wrong
    /// number of elements for the shape.
    #[error(
        "tensor `{tensor}` has {actual} {}, but shape {shape} needs {expected}; \
         pass a tensor of that shape",
        if *.actual == 1 { "element" } else { "elements" }
    )]
    LengthMismatch {
        /// Which tensor (`q`, `k`, `v`, `mask`, `out`, `lse`).
        tensor: &'static str,
        /// Elements the shape needs.
        expected: usize,
        /// Elements given.
        actual: usize,
        /// The expected shape, written out.
        shape: String,
    },

    /// A GPU buffer is smaller than the shape needs.
    #[error(
        "buffer `{tensor}` is {size} bytes, but shape {shape} of {element_bytes}-byte elements \
         needs {needed}; create it with at least {needed} bytes"
    )]
    BufferTooSmall {
        /// Which tensor.
        tensor: &'static str,
        /// The buffer's size in bytes.
        size: u64,
        /// The bytes the shape needs.
        needed: u64,
        /// The expected shape, written out.
        shape: String,
        /// Bytes per element: 4 for f32 and u32, 2 for f16.
        element_bytes: usize,
    },

    /// A GPU buffer's size is not a multiple of 4 bytes, which storage bindings need.
    #[error(
        "buffer `{tensor}` is {size} bytes, but storage bindings take a multiple of 4 bytes; \
         create it with {} bytes",
        .size.next_multiple_of(4)
    )]
    UnalignedBuffer {
        /// Which tensor.
        tensor: &'static str,
        /// The buffer's size in bytes.
        size: u64,
    },

    /// A mask tensor was given without a mask shape in the problem, or the reverse.
    #[error("{0}")]
    MaskMismatch(&'static str),

    /// Sequence offsets were given without packed sequences in the problem, or the reverse.
    #[error("{0}")]
    PackedMismatch(&'static str),

    /// The problem gives key lengths the meaning of [`crate::KeyLengths::Cache`], but the call
    /// has no key lengths.
    #[error(
        "the problem's key lengths are KeyLengths::Cache, but no kv_seq_lens were given; pass \
         the filled length of each batch element's cache with with_kv_seq_lens, or leave the \
         problem at KeyLengths::Padding"
    )]
    MissingKeyLengths,

    /// A length or offset in `kv_seq_lens`, `cu_seqlens_q` or `cu_seqlens_kv` is out of range.
    #[error("{tensor}[{index}] = {value} is invalid: {reason}; {fix}")]
    InvalidLengths {
        /// Which tensor.
        tensor: &'static str,
        /// Index of the bad entry.
        index: usize,
        /// Its value.
        value: u32,
        /// The reason it is invalid.
        reason: String,
        /// The change that fixes it.
        fix: &'static str,
    },

    /// The sizes or strides of a tensor address more elements than `usize` counts.
    #[error("the sizes of {what} overflow usize; use smaller dimensions or strides")]
    SizeOverflow {
        /// The tensor or product that overflows.
        what: String,
    },

    /// The output's strides are not nested, so two elements may share a place. Strides pass
    /// when, sorted by size, each one is larger than the span that the smaller ones cover, with
    /// dimensions of extent 1 left out.
    #[error(
        "the strides of `{tensor}` ({strides}) may map two elements to the same place: sorted \
         by size, each stride must be larger than the span that the smaller strides cover \
         (dimensions of extent 1 aside). Give each (batch, head, position, column) its own \
         element, for example with Layout::Bhsd"
    )]
    OverlappingStrides {
        /// Which tensor.
        tensor: &'static str,
        /// The strides, written out.
        strides: String,
    },

    /// The problem's dtype does not match the element type of the data given.
    #[error("the problem's dtype is {dtype} but {given} data was given; {fix}")]
    DtypeMismatch {
        /// The problem's dtype.
        dtype: &'static str,
        /// The element type of the data.
        given: &'static str,
        /// What to change.
        fix: &'static str,
    },

    /// The device lacks a feature the request needs.
    #[error("{what} needs the device feature {feature}, which this device lacks; {fix}")]
    MissingFeature {
        /// The wgpu feature's name.
        feature: &'static str,
        /// What needs it.
        what: &'static str,
        /// What to do instead.
        fix: &'static str,
    },

    /// A caller's buffer lacks a usage flag the kernels need.
    #[error(
        "buffer `{tensor}` lacks usage {}; create it with that usage flag",
        usage_names(.missing)
    )]
    BufferUsage {
        /// Which tensor.
        tensor: &'static str,
        /// The missing usage flags.
        missing: wgpu::BufferUsages,
    },

    /// A row index passed to [`crate::reference::attention_row`] is outside the problem.
    #[error(
        "row (b = {b}, h = {h}, i = {i}) is outside the problem: batch {batch}, heads {heads}, \
         {rows} rows in that sequence; pass indices below those"
    )]
    RowOutOfRange {
        /// Batch index given.
        b: usize,
        /// Query head given.
        h: usize,
        /// Row given.
        i: usize,
        /// Batch elements of the problem.
        batch: usize,
        /// Query heads of the problem.
        heads: usize,
        /// Rows of the sequence of `b` (0 when `b` is out of range).
        rows: usize,
    },

    /// A buffer the kernels write is also bound as another tensor.
    #[error(
        "buffer `{written}` is also given as `{other}`; the kernels write `{written}` while they \
         use `{other}`, so give `{written}` a buffer of its own"
    )]
    BufferAlias {
        /// The written tensor: `out` or `lse`.
        written: &'static str,
        /// The other tensor bound to the same buffer.
        other: &'static str,
    },

    /// The problem exceeds a device limit and cannot be split to fit.
    #[error("{what} needs {value} but the device limit `{limit_name}` is {limit}; {fix}")]
    ExceedsLimit {
        /// What needs the resource.
        what: String,
        /// The amount needed.
        value: u64,
        /// The name of the limit in [`wgpu::Limits`].
        limit_name: &'static str,
        /// The limit's value on this device.
        limit: u64,
        /// What to do about it.
        fix: &'static str,
    },

    /// No adapter was found at all.
    #[error("no GPU adapter found; {INSTALL_HINT}")]
    NoAdapter,

    /// No adapter matches the requested name or backend.
    #[error("no adapter matches `{request}` (available: {available}); {ADAPTER_HINT}")]
    AdapterNotFound {
        /// The requested name part or backend.
        request: String,
        /// The adapters that were found, comma-separated.
        available: String,
    },

    /// The device could not be created.
    #[error("requesting a device from adapter `{adapter}` failed: {source}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// wgpu's error.
        source: wgpu::RequestDeviceError,
    },

    /// The caller asked for a kernel that does not support this problem.
    #[error("kernel {kernel} does not support {what}; {fix}")]
    Unsupported {
        /// The kernel's name.
        kernel: &'static str,
        /// The unsupported part of the problem.
        what: String,
        /// What to do about it.
        fix: &'static str,
    },

    /// wgpu reported a validation or out-of-memory error while recording or running the kernels.
    #[error("wgpu reported an error during {during}: {source}")]
    Device {
        /// The step that failed.
        during: &'static str,
        /// wgpu's error.
        source: wgpu::Error,
    },

    /// Mapping a buffer for read-back, or waiting for the device, failed.
    #[error("reading results back from the device failed: {0}")]
    ReadBack(String),

    /// A fixture file is malformed or holds options this crate does not support.
    #[error("{path}: {message}")]
    Fixture {
        /// The file.
        path: String,
        /// What is wrong, and how to fix it where that is known.
        message: String,
    },

    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Lists the divisors of `n` for an error message, eliding the middle of a long list.
fn divisors(n: usize) -> String {
    // Far past any model's head count, listing would take long; describe the values instead.
    if n > 1 << 20 {
        return format!("the divisors of {n}");
    }
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut d = 1;
    while d <= n / d {
        if n.is_multiple_of(d) {
            small.push(d);
            if d * d != n {
                large.push(n / d);
            }
        }
        d += 1;
    }
    let all: Vec<usize> = small.into_iter().chain(large.into_iter().rev()).collect();
    let listed: Vec<String> = if all.len() <= 12 {
        all.iter().map(usize::to_string).collect()
    } else {
        let head = all[..6].iter().map(usize::to_string);
        let tail = all[all.len() - 3..].iter().map(usize::to_string);
        head.chain(["...".to_string()]).chain(tail).collect()
    };
    listed.join(", ")
}

/// Writes usage flags as their names joined by ` | `, as in `COPY_SRC | STORAGE`.
fn usage_names(usages: &wgpu::BufferUsages) -> String {
    usages
        .iter_names()
        .map(|(name, _)| name)
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisors_lists_short_lists_whole() {
        assert_eq!(divisors(1), "1");
        assert_eq!(divisors(8), "1, 2, 4, 8");
        assert_eq!(divisors(36), "1, 2, 3, 4, 6, 9, 12, 18, 36");
    }

    #[test]
    fn divisors_elides_long_lists() {
        assert_eq!(divisors(720), "1, 2, 3, 4, 5, 6, ..., 240, 360, 720");
    }

    #[test]
    fn usage_names_are_joined() {
        let both = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        assert_eq!(usage_names(&both), "COPY_SRC | STORAGE");
        let error = Error::LengthMismatch {
            tensor: "lse",
            expected: 2,
            actual: 1,
            shape: "[2]".to_string(),
        };
        assert!(error.to_string().contains("has 1 element, but"), "{error}");
    }
}
