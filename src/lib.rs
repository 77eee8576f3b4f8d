//! Multi-head scaled dot-product attention as WGSL compute shaders on any adapter wgpu reaches,
//! checked against an f64 CPU reference.
//!
//! ```no_run
//! use wgpu_attention::{AttentionInputs, AttentionProblem, AttentionShape, Causal, Context};
//!
//! # fn main() -> Result<(), wgpu_attention::Error> {
//! let context = Context::new()?;
//! // batch 1, 8 query heads sharing 2 key/value heads, 100 queries, 100 keys, head dim 64
//! let shape = AttentionShape::new(1, 8, 100, 100, 64).with_kv_heads(2);
//! let problem = AttentionProblem::new(shape).with_causal(Causal::TopLeft);
//! let q = vec![0.5f32; shape.q_len()];
//! let k = vec![0.25f32; shape.k_len()];
//! let v = vec![1.0f32; shape.v_len()];
//! let out = context.attention(&problem, &AttentionInputs::new(&q, &k, &v))?;
//! assert_eq!(out.len(), shape.out_len());
//! # Ok(())
//! # }
//! ```
//!
//! The default layout is `[batch, heads, seq, head_dim]`, f32 or f16; [`Layout`] selects BSHD or
//! any strides, and [`AttentionProblem::with_packed`] packed variable-length sequences. ALiBi,
//! attention sinks and key lengths come with the inputs ([`AttentionInputs`]). [`mod@reference`]
//! defines the semantics, and [`validate`] contains the error metrics and tolerances for checking
//! any result against it. [`Context::record`] runs on the caller's own buffers and encoder,
//! [`Context::prepare`] builds such a call once for a loop to record on every step, and
//! [`Context::from_device`] runs on the caller's own device.

#![warn(missing_docs)]

mod attention;
mod context;
mod error;
pub mod fixture;
mod inputs;
mod kernels;
mod merge;
mod problem;
pub mod random;
pub mod reference;
pub mod validate;

pub use attention::{
    AUTO_FLASH_MAX_SEQ_Q, AttentionInputsF16, AttentionOutput, AttentionOutputF16, GpuTensors,
    Kernel, PreparedAttention,
};
pub use context::{
    ADAPTER_ENV, Context, LLVMPIPE_MAX_LOOP_ITERATIONS, adapter_request_from_env, backend_name,
    enumerate_adapters, select_adapter,
};
pub use error::{Error, INSTALL_HINT, Result};
/// The f16 type of the `half` crate, used by [`Context::attention_f16`].
pub use half::f16;
pub use inputs::{AttentionInputs, OwnedInputs};
pub use merge::merge_partials;
pub use problem::{
    AttentionProblem, AttentionShape, Causal, Dtype, KeyLengths, Layout, MAX_HEAD_DIM, MaskShape,
    Packed, Sequence, Strides, TensorStrides, Window,
};
/// The `wgpu` this crate is built with, for callers' own devices, buffers and encoders.
pub use wgpu;
