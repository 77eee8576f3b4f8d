//! Entry points: host-slice calls that upload, run and read back, and a recording call that
//! works on the caller's buffers inside the caller's command encoder.

use std::sync::atomic::Ordering;

use wgpu::util::DeviceExt;

use crate::context::{Context, Scratch};
use crate::error::{Error, Result};
use crate::inputs::{AttentionInputs, OptionalLens};
use crate::kernels::{
    AuxLayout, Command, EXTRA_ALIBI, EXTRA_KV_LENS, EXTRA_PACKED, EXTRA_SINKS, SPLIT_KEYS_FIX,
    SPLIT_ROWS_FIX, check_binding, encode, flash, three_stage,
};
use crate::problem::{AttentionProblem, Dtype};
use half::f16;

/// Largest `seq_q` for which [`Kernel::Auto`] picks the fused kernel when the score matrix fits.
///
/// The tiled fused program ran 5.0 times faster than the three-stage kernel on lavapipe for one
/// query over 1024 keys (32 heads, head dim 128) but 2.0 times slower at 512 × 512
/// (`cargo bench --bench attention`, Mesa 22.3.6, 2 cores). So on GPUs, where that program runs,
/// the fused kernel is chosen where the three-stage kernel's 64-row tiles are mostly padding.
// NOTE: measured on lavapipe only; on GPUs the crossover is likely at a larger seq_q.
pub const AUTO_FLASH_MAX_SEQ_Q: usize = 16;

/// Which kernels compute the attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kernel {
    /// The fused kernel on CPU adapters, where it was faster at every measured shape. On GPUs,
    /// the fused kernel for decoding-sized query counts (`seq_q <= AUTO_FLASH_MAX_SEQ_Q`) and for
    /// problems the three-stage kernel cannot run; the three-stage kernel otherwise.
    #[default]
    Auto,
    /// One fused pass: scores, online softmax and output per block of query rows, with keys and
    /// values streamed through workgroup memory, and a merge pass when the key range is split.
    /// Memory grows with the inputs only. On GPUs it runs [`Kernel::FlashTiled`]. On CPU
    /// adapters it runs [`Kernel::FlashDecode`] where a key/value head has at most 4 query rows
    /// (heads per key/value head × `seq_q`), and [`Kernel::FlashSubgroup`] above. Where the
    /// device cannot run the subgroup program, the decoding program takes its place, and above
    /// head dim 128 the tiled program runs.
    Flash,
    /// The fused kernel's tiled program: blocks of key lanes × row lanes sharing a Q block.
    FlashTiled,
    /// The fused kernel's row program: one query row per invocation, head dims up to 128.
    FlashRows,
    /// The fused kernel's decoding program, for head dims up to 128. Each workgroup takes a block
    /// of up to 4 query rows of one key/value head, and its invocations each take a run of
    /// consecutive keys, reading each key and value row once for the whole block.
    /// [`Kernel::Flash`] picks it on CPU adapters for decoding, where a key/value head has at
    /// most 4 query rows, and wherever the subgroup program cannot run.
    FlashDecode,
    /// The fused kernel's subgroup program, for head dims up to 128 on devices with the
    /// `SUBGROUP` feature whose subgroups all have 8 invocations, such as lavapipe. A workgroup is one subgroup, each invocation owns up
    /// to 4 query rows, and each key and value row read from memory reaches the block's other
    /// invocations through subgroup broadcasts. [`Kernel::Flash`] picks it on CPU adapters for
    /// prefill. On lavapipe it ran 2.1 times faster than [`Kernel::FlashDecode`] at
    /// 2,048 × 2,048 (8 heads, head dim 64).
    FlashSubgroup,
    /// Scores, softmax and output as three dispatches, with the score matrix in memory. Memory
    /// grows with `seq_q × seq_kv`, bounded per dispatch by processing heads in chunks.
    ThreeStage,
}

impl Kernel {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Auto => "auto",
            Kernel::Flash => "flash",
            Kernel::FlashTiled => "flash-tiled",
            Kernel::FlashRows => "flash-rows",
            Kernel::FlashDecode => "flash-decode",
            Kernel::FlashSubgroup => "flash-subgroup",
            Kernel::ThreeStage => "three-stage",
        }
    }

    /// Parses a name written by [`Kernel::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Kernel::Auto),
            "flash" => Some(Kernel::Flash),
            "flash-tiled" => Some(Kernel::FlashTiled),
            "flash-rows" => Some(Kernel::FlashRows),
            "flash-decode" => Some(Kernel::FlashDecode),
            "flash-subgroup" => Some(Kernel::FlashSubgroup),
            "three-stage" => Some(Kernel::ThreeStage),
            _ => None,
        }
    }

    /// Returns the kernel that runs `problem` on `context`'s device: [`Kernel::Auto`] resolves
    /// to a concrete kernel and [`Kernel::Flash`] to the fused program it picks
    /// ([`Kernel::FlashDecode`], [`Kernel::FlashSubgroup`], [`Kernel::FlashRows`] or
    /// [`Kernel::FlashTiled`]). Other kernels return themselves, and so does `Flash` when no
    /// fused program can run the problem.
    pub fn resolve(self, problem: &AttentionProblem, context: &Context) -> Kernel {
        let fused_program = || {
            flash::plan(context, Kernel::Flash, problem)
                .ok()
                .map(|plan| match plan.variant {
                    flash::FlashVariant::Rows(_) => Kernel::FlashRows,
                    flash::FlashVariant::Subgroup(_) => Kernel::FlashSubgroup,
                    flash::FlashVariant::Decode(_) => Kernel::FlashDecode,
                    flash::FlashVariant::Tiled(_) => Kernel::FlashTiled,
                })
        };
        match self {
            Kernel::Flash => fused_program().unwrap_or(Kernel::Flash),
            Kernel::Auto => {
                let on_cpu = context.on_cpu();
                let short_queries = problem.shape.seq_q <= AUTO_FLASH_MAX_SEQ_Q;
                let three_stage_fits = three_stage::check(context, problem).is_ok();
                match fused_program() {
                    Some(program) if on_cpu || short_queries || !three_stage_fits => program,
                    _ => Kernel::ThreeStage,
                }
            }
            other => other,
        }
    }
}

/// Host-side f16 inputs for [`Context::attention_f16`], laid out as [`AttentionInputs`]; the
/// mask and the other optional tensors stay f32 or u32, because `-inf` and large biases need
/// their range.
pub type AttentionInputsF16<'a> = AttentionInputs<'a, f16>;

/// Output of [`Context::attention_f16`].
#[derive(Clone, Debug)]
pub struct AttentionOutputF16 {
    /// Attention output in the problem's layout (`[batch, heads, seq_q, head_dim_v]` by
    /// default), rounded to f16.
    pub out: Vec<f16>,
    /// Natural-log log-sum-exp of each row in f32, laid out as in [`AttentionOutput`].
    pub lse: Vec<f32>,
}

/// Output of a host-slice call.
#[derive(Clone, Debug)]
pub struct AttentionOutput {
    /// Attention output in the problem's layout: `[batch, heads, seq_q, head_dim_v]` by default.
    /// Elements the layout skips, and rows outside every packed sequence, are 0.
    pub out: Vec<f32>,
    /// Natural-log log-sum-exp of each row's final scores, `[batch, heads, seq_q]`, or
    /// `[heads, total_q]` with packed sequences; `-inf` for a fully masked row.
    pub lse: Vec<f32>,
}

/// The caller's GPU buffers for [`Context::record`], each read from offset 0. A buffer may be
/// larger than its tensor, and the kernels use its first elements.
///
/// Inputs need [`wgpu::BufferUsages::STORAGE`]; `out` and `lse` are written by the kernels. The
/// small per-head and per-sequence tensors are copied into one scratch buffer first, so they
/// need [`wgpu::BufferUsages::COPY_SRC`] instead. Build it with [`GpuTensors::new`] and the
/// `with_*` methods.
#[derive(Clone, Copy, Debug)]
pub struct GpuTensors<'a> {
    /// Queries in the problem's layout and dtype (f32 or f16).
    pub q: &'a wgpu::Buffer,
    /// Keys in the problem's layout and dtype.
    pub k: &'a wgpu::Buffer,
    /// Values in the problem's layout and dtype.
    pub v: &'a wgpu::Buffer,
    /// Additive mask, `[mask_batch, mask_heads, seq_q, seq_kv]` f32, when the problem has one.
    pub mask: Option<&'a wgpu::Buffer>,
    /// Output in the problem's layout and dtype.
    pub out: &'a wgpu::Buffer,
    /// Log-sum-exp output, f32 `[batch, heads, seq_q]` (`[heads, total_q]` with packed
    /// sequences); when `None` the kernels write it to a scratch buffer.
    pub lse: Option<&'a wgpu::Buffer>,
    /// ALiBi slopes, f32 `[heads]`.
    pub alibi_slopes: Option<&'a wgpu::Buffer>,
    /// Sink logits, f32 `[heads]`.
    pub sinks: Option<&'a wgpu::Buffer>,
    /// Key lengths, u32 `[batch]` (non-negative i32 values have the same bits).
    pub kv_seq_lens: Option<&'a wgpu::Buffer>,
    /// Offsets of packed query sequences, u32 `[batch + 1]`.
    pub cu_seqlens_q: Option<&'a wgpu::Buffer>,
    /// Offsets of packed key sequences, u32 `[batch + 1]`.
    pub cu_seqlens_kv: Option<&'a wgpu::Buffer>,
}

impl<'a> GpuTensors<'a> {
    /// Buffers of Q, K, V and the output, with no optional tensors.
    pub fn new(
        q: &'a wgpu::Buffer,
        k: &'a wgpu::Buffer,
        v: &'a wgpu::Buffer,
        out: &'a wgpu::Buffer,
    ) -> Self {
        Self {
            q,
            k,
            v,
            mask: None,
            out,
            lse: None,
            alibi_slopes: None,
            sinks: None,
            kv_seq_lens: None,
            cu_seqlens_q: None,
            cu_seqlens_kv: None,
        }
    }

    /// Adds the additive mask declared by [`AttentionProblem::with_mask`].
    pub fn with_mask(mut self, mask: &'a wgpu::Buffer) -> Self {
        self.mask = Some(mask);
        self
    }

    /// Writes the log-sum-exp into `lse`.
    pub fn with_lse(mut self, lse: &'a wgpu::Buffer) -> Self {
        self.lse = Some(lse);
        self
    }

    /// Adds ALiBi slopes, one f32 per query head.
    pub fn with_alibi_slopes(mut self, slopes: &'a wgpu::Buffer) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }

    /// Adds attention sinks, one f32 logit per query head.
    pub fn with_sinks(mut self, sinks: &'a wgpu::Buffer) -> Self {
        self.sinks = Some(sinks);
        self
    }

    /// Adds key lengths, one u32 per batch element.
    pub fn with_kv_seq_lens(mut self, lens: &'a wgpu::Buffer) -> Self {
        self.kv_seq_lens = Some(lens);
        self
    }

    /// Adds the offsets of packed sequences declared by [`AttentionProblem::with_packed`].
    pub fn with_cu_seqlens(mut self, q: &'a wgpu::Buffer, kv: &'a wgpu::Buffer) -> Self {
        self.cu_seqlens_q = Some(q);
        self.cu_seqlens_kv = Some(kv);
        self
    }
}

/// An attention call checked and built once by [`Context::prepare`], to record as often as needed.
///
/// Recording it creates nothing: its uniforms, bind groups and scratch buffers were made by
/// `prepare`, and it keeps the caller's buffers alive until it is dropped. Two prepared calls may
/// share the context's scratch buffers; that is sound for the reason given at [`Context`]. It is
/// `Send + Sync`. After `prepare`, nothing is checked again: a buffer destroyed since then is
/// reported by wgpu at submission, through the device's error handler.
pub struct PreparedAttention {
    kernel: Kernel,
    commands: Vec<Command>,
}

impl PreparedAttention {
    /// Records the call into `encoder`, as [`Context::record`] would have recorded it.
    pub fn record(&self, encoder: &mut wgpu::CommandEncoder) {
        encode(&self.commands, encoder);
    }

    /// Returns the kernel that runs, with [`Kernel::Auto`] and [`Kernel::Flash`] resolved to the
    /// one they picked.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }
}

impl std::fmt::Debug for PreparedAttention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedAttention")
            .field("kernel", &self.kernel)
            .field("commands", &self.commands.len())
            .finish()
    }
}

impl Context {
    /// Computes attention on the GPU from host slices and returns the output in the problem's
    /// layout (`[batch, heads, seq_q, head_dim_v]` by default).
    ///
    /// Supports every option of [`AttentionProblem`] and [`AttentionInputs`]: head dims up to
    /// [`crate::MAX_HEAD_DIM`], grouped-query attention, both causal alignments, additive masks,
    /// soft-capping, sliding windows, ALiBi, sinks, key lengths, strided layouts and packed
    /// sequences. Blocks until the result is read back.
    ///
    /// # Errors
    ///
    /// An invalid problem, slice lengths that do not match it, a tensor larger than the device's
    /// storage binding limit, or an error reported by wgpu.
    pub fn attention(
        &self,
        problem: &AttentionProblem,
        inputs: &AttentionInputs<'_>,
    ) -> Result<Vec<f32>> {
        Ok(self.attention_with(Kernel::Auto, problem, inputs)?.out)
    }

    /// Computes attention with the chosen kernel and returns the output and the log-sum-exp.
    ///
    /// # Errors
    ///
    /// As [`Context::attention`], and [`Error::DtypeMismatch`] when the problem's dtype is not
    /// f32: f16 data goes through [`Context::attention_f16`].
    pub fn attention_with(
        &self,
        kernel: Kernel,
        problem: &AttentionProblem,
        inputs: &AttentionInputs<'_>,
    ) -> Result<AttentionOutput> {
        Ok(self.attention_f32(kernel, problem, inputs, false)?.0)
    }

    /// Computes attention with the three-stage kernel and also returns the attention
    /// probabilities, `[batch, heads, seq_q, seq_kv]`: the softmax of the scaled, capped and
    /// masked scores, 0 for masked keys and for every key of a fully masked row.
    ///
    /// # Errors
    ///
    /// As [`Context::attention`], and [`Error::ExceedsLimit`] when the probabilities exceed the
    /// device's `max_buffer_size`.
    pub fn attention_probs(
        &self,
        problem: &AttentionProblem,
        inputs: &AttentionInputs<'_>,
    ) -> Result<(AttentionOutput, Vec<f32>)> {
        let (output, probs) = self.attention_f32(Kernel::ThreeStage, problem, inputs, true)?;
        // run_host returns the probabilities whenever they were requested.
        Ok((output, probs.unwrap_or_default()))
    }

    fn attention_f32(
        &self,
        kernel: Kernel,
        problem: &AttentionProblem,
        inputs: &AttentionInputs<'_>,
        with_probs: bool,
    ) -> Result<(AttentionOutput, Option<Vec<f32>>)> {
        if problem.dtype != Dtype::F32 {
            return Err(Error::DtypeMismatch {
                dtype: problem.dtype.name(),
                given: "f32",
                fix: "set the problem's dtype to Dtype::F32, or pass f16 slices to attention_f16",
            });
        }
        problem.validate()?;
        inputs.validate(problem)?;
        let result = self.run_host(kernel, problem, &bytes_of_inputs(inputs), with_probs)?;
        let output = AttentionOutput {
            out: bytemuck::pod_collect_to_vec(&result.out_bytes),
            lse: result.lse,
        };
        Ok((output, result.probs))
    }

    /// Computes attention on f16 inputs and returns an f16 output and the f32 log-sum-exp.
    ///
    /// With `SHADER_F16` the tensors stay f16 in GPU memory and every product, sum and the
    /// softmax run in f32. Without it the inputs are widened to f32 on the host (exactly), the
    /// f32 kernels run, and the output is rounded to f16; a warning is logged. The problem's
    /// `dtype` need not be set: the slices' type decides it.
    ///
    /// # Errors
    ///
    /// As [`Context::attention`].
    pub fn attention_f16(
        &self,
        kernel: Kernel,
        problem: &AttentionProblem,
        inputs: &AttentionInputsF16<'_>,
    ) -> Result<AttentionOutputF16> {
        let problem = problem.with_dtype(Dtype::F16);
        problem.validate()?;
        inputs.validate(&problem)?;
        if !self.features().contains(wgpu::Features::SHADER_F16) {
            if !self.warned_f16_conversion.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "the device lacks SHADER_F16; converting f16 inputs to f32 on the host and \
                     the output back to f16 (logged once per context)"
                );
            }
            let widen = |data: &[f16]| data.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
            let (q, k, v) = (widen(inputs.q), widen(inputs.k), widen(inputs.v));
            let f32_inputs = inputs.with_tensors(&q, &k, &v);
            let output =
                self.attention_with(kernel, &problem.with_dtype(Dtype::F32), &f32_inputs)?;
            let out = output.out.iter().map(|&x| f16::from_f32(x)).collect();
            return Ok(AttentionOutputF16 {
                out,
                lse: output.lse,
            });
        }
        let result = self.run_host(kernel, &problem, &bytes_of_inputs(inputs), false)?;
        Ok(AttentionOutputF16 {
            out: bytemuck::pod_collect_to_vec(&result.out_bytes),
            lse: result.lse,
        })
    }

    /// Uploads the inputs (Q, K and V as raw bytes of the problem's dtype), runs `kernel` and
    /// returns the output's raw bytes, the log-sum-exp and, when asked, the probabilities.
    fn run_host(
        &self,
        kernel: Kernel,
        problem: &AttentionProblem,
        inputs: &AttentionInputs<'_, u8>,
        with_probs: bool,
    ) -> Result<HostResult> {
        self.check_bindings(problem)?;
        let s = &problem.shape;
        let probs_len = s.batch * s.heads * s.scores_per_head();
        if with_probs && 4 * probs_len as u64 > self.limits().max_buffer_size {
            return Err(Error::ExceedsLimit {
                what: format!("the attention probabilities ({probs_len} f32 values)"),
                value: 4 * probs_len as u64,
                limit_name: "max_buffer_size",
                limit: self.limits().max_buffer_size,
                fix: "request probabilities for fewer heads or shorter sequences per call",
            });
        }
        let device = self.device();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom_scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);

        let upload = |label: &str, data: &[u8], usage: wgpu::BufferUsages| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &padded(data),
                usage,
            })
        };
        let storage = |label: &str, data: &[u8]| upload(label, data, wgpu::BufferUsages::STORAGE);
        // The small tensors are copied into the kernels' scratch buffer.
        let small = |label: &str, data: Option<&[u8]>| {
            data.map(|data| upload(label, data, wgpu::BufferUsages::COPY_SRC))
        };
        let output = |label: &str, bytes: usize| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                // Storage bindings are sized in multiples of 4 bytes.
                size: bytes.next_multiple_of(4) as u64,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        };
        let element = problem.dtype.bytes();
        let out_bytes = problem.spans()[3] * element;
        let q = storage("wgpu-attention q", inputs.q);
        let k = storage("wgpu-attention k", inputs.k);
        let v = storage("wgpu-attention v", inputs.v);
        let mask = inputs
            .mask
            .map(|mask| storage("wgpu-attention mask", bytemuck::cast_slice(mask)));
        let alibi = small(
            "wgpu-attention alibi",
            inputs.alibi_slopes.map(bytemuck::cast_slice),
        );
        let sinks = small(
            "wgpu-attention sinks",
            inputs.sinks.map(bytemuck::cast_slice),
        );
        let lens = small(
            "wgpu-attention lens",
            inputs.kv_seq_lens.map(bytemuck::cast_slice),
        );
        let cu_q = small(
            "wgpu-attention cu q",
            inputs.cu_seqlens_q.map(bytemuck::cast_slice),
        );
        let cu_kv = small(
            "wgpu-attention cu kv",
            inputs.cu_seqlens_kv.map(bytemuck::cast_slice),
        );
        let out = output("wgpu-attention out", out_bytes);
        let lse = output("wgpu-attention lse", 4 * problem.lse_len());

        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("wgpu-attention"),
        });
        let tensors = GpuTensors {
            q: &q,
            k: &k,
            v: &v,
            mask: mask.as_ref(),
            out: &out,
            lse: Some(&lse),
            alibi_slopes: alibi.as_ref(),
            sinks: sinks.as_ref(),
            kv_seq_lens: lens.as_ref(),
            cu_seqlens_q: cu_q.as_ref(),
            cu_seqlens_kv: cu_kv.as_ref(),
        };
        let probs = with_probs.then(|| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("wgpu-attention probs"),
                size: 4 * probs_len as u64,
                usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        });
        let (_, commands) = self.commands(kernel, problem, &tensors, probs.as_ref())?;
        encode(&commands, &mut encoder);
        let out_staging = copy_to_staging(device, &mut encoder, &out);
        let lse_staging = copy_to_staging(device, &mut encoder, &lse);
        let probs_staging = probs
            .as_ref()
            .map(|probs| copy_to_staging(device, &mut encoder, probs));
        self.queue().submit([encoder.finish()]);

        let out_host = read_back(device, &out_staging);
        let lse_host = read_back(device, &lse_staging);
        let probs_host = probs_staging
            .map(|staging| read_back(device, &staging))
            .transpose();
        if let Some(source) = pollster::block_on(oom_scope.pop()) {
            return Err(Error::Device {
                during: "attention",
                source,
            });
        }
        if let Some(source) = pollster::block_on(scope.pop()) {
            return Err(Error::Device {
                during: "attention",
                source,
            });
        }
        let mut out_host = out_host?;
        out_host.truncate(out_bytes);
        Ok(HostResult {
            out_bytes: out_host,
            lse: bytemuck::pod_collect_to_vec(&lse_host?),
            probs: probs_host?.map(|bytes| bytemuck::pod_collect_to_vec(&bytes)),
        })
    }

    /// Records attention into the caller's `encoder`, reading and writing the caller's buffers,
    /// with no read-back. Submit the encoder to run it.
    ///
    /// Each call creates its uniforms and bind groups. The small scratch buffers are the
    /// context's, reused from call to call (see [`Context`]). The three-stage kernel's score
    /// buffer is created per call and released once the submitted work completes. A loop that
    /// records the same call on every step can build it once with [`Context::prepare`].
    /// Offsets and lengths in GPU buffers cannot be checked here: a sequence longer than the
    /// shape's `seq_q` or `seq_kv` is cut to it, and one that reaches past the packed tensors'
    /// `total_q` or `total_kv` rows is cut at their end.
    ///
    /// # Errors
    ///
    /// An invalid problem, buffers smaller than the problem needs or without the usage they
    /// need, a mask or packed-sequence offsets given without their declaration in the problem
    /// (or the reverse), [`KeyLengths::Cache`](crate::KeyLengths::Cache) without a key-length
    /// buffer, or a tensor larger than the device's storage binding limit.
    pub fn record(
        &self,
        kernel: Kernel,
        problem: &AttentionProblem,
        encoder: &mut wgpu::CommandEncoder,
        tensors: &GpuTensors<'_>,
    ) -> Result<()> {
        let (_, commands) = self.commands(kernel, problem, tensors, None)?;
        encode(&commands, encoder);
        Ok(())
    }

    /// Checks the call and builds what [`Context::record`] would record, to be recorded by
    /// [`PreparedAttention::record`] as often as needed with no further work on the host.
    ///
    /// The prepared call keeps the problem and the buffers: each recording reads and writes the
    /// buffers as they are when the work runs. In a decoding loop, allocate K and V for the
    /// longest sequence, declare that length as `seq_kv`, and set
    /// [`KeyLengths::Cache`](crate::KeyLengths::Cache) on the problem. Then give the current
    /// lengths in a `kv_seq_lens` buffer (`COPY_SRC | COPY_DST`) that
    /// [`wgpu::Queue::write_buffer`] updates before each step. The kernels skip the keys past
    /// each length, and the causal mask, a sliding window and ALiBi are placed by it. The fused
    /// kernel splits each sequence's keys across workgroups by its own length, so the work of a
    /// step follows the filled part of the cache, not `seq_kv`.
    ///
    /// `seq_q` is part of the problem, so a chunked prefill and the one-row steps after it are
    /// two prepared calls. The rows of a chunk are the last `seq_q` positions of each filled
    /// cache: a batch element with fewer new tokens puts them in the last rows.
    ///
    /// # Errors
    ///
    /// As [`Context::record`].
    pub fn prepare(
        &self,
        kernel: Kernel,
        problem: &AttentionProblem,
        tensors: &GpuTensors<'_>,
    ) -> Result<PreparedAttention> {
        let (kernel, commands) = self.commands(kernel, problem, tensors, None)?;
        Ok(PreparedAttention { kernel, commands })
    }

    /// Checks the call and builds its commands: the copies of the small tensors, then the
    /// kernels' passes. Returns them with the kernel that `kernel` resolves to. When `probs` is
    /// given, the three-stage kernel also copies the attention probabilities into it.
    fn commands(
        &self,
        kernel: Kernel,
        problem: &AttentionProblem,
        tensors: &GpuTensors<'_>,
        probs: Option<&wgpu::Buffer>,
    ) -> Result<(Kernel, Vec<Command>)> {
        problem.validate()?;
        self.check_bindings(problem)?;
        if problem.dtype == Dtype::F16 && !self.features().contains(wgpu::Features::SHADER_F16) {
            return Err(Error::MissingFeature {
                feature: "SHADER_F16",
                what: "keeping f16 tensors in GPU buffers",
                fix: "convert the tensors to f32, or call attention_f16, which converts on the host",
            });
        }
        check_aliases(tensors)?;
        let element = problem.dtype.bytes();
        let spans = problem.spans();
        let [q_shape, k_shape, v_shape, out_shape] = problem.layout_shapes();
        check_buffer("q", tensors.q, spans[0], &q_shape, element)?;
        check_buffer("k", tensors.k, spans[1], &k_shape, element)?;
        check_buffer("v", tensors.v, spans[2], &v_shape, element)?;
        check_buffer("out", tensors.out, spans[3], &out_shape, element)?;
        if let Some(lse) = tensors.lse {
            let len = problem.lse_len();
            check_buffer("lse", lse, len, &format!("[{len}]"), 4)?;
        }
        match (problem.mask_dims(), tensors.mask) {
            (Some(dims), Some(mask)) => {
                check_buffer("mask", mask, problem.mask_len(), &format!("{dims:?}"), 4)?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(Error::MaskMismatch(
                    "the problem has a mask shape but no mask buffer was given; pass the mask \
                     buffer in GpuTensors::with_mask, or remove the mask shape",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::MaskMismatch(
                    "a mask buffer was given but the problem has no mask shape; call \
                     AttentionProblem::with_mask",
                ));
            }
        }
        let small = |buffer: Option<&wgpu::Buffer>| buffer.map(|b| b.size() as usize / 4);
        OptionalLens {
            alibi_slopes: small(tensors.alibi_slopes),
            sinks: small(tensors.sinks),
            kv_seq_lens: small(tensors.kv_seq_lens),
            cu_seqlens: match (tensors.cu_seqlens_q, tensors.cu_seqlens_kv) {
                (None, None) => None,
                (q, kv) => Some((small(q).unwrap_or(0), small(kv).unwrap_or(0))),
            },
        }
        .check(problem, false)?;

        // wgpu reports some invalid buffers, such as a destroyed one or one of another device,
        // only when the bind groups are created, and by default it panics on them. The scope
        // returns them as Error::Device instead.
        let scope = self
            .device()
            .push_error_scope(wgpu::ErrorFilter::Validation);
        let built = self.build_commands(kernel, problem, tensors, probs);
        if let Some(source) = pollster::block_on(scope.pop()) {
            return Err(Error::Device {
                during: "binding the buffers",
                source,
            });
        }
        built
    }

    /// Builds the commands of a call that [`Context::commands`] has checked.
    fn build_commands(
        &self,
        kernel: Kernel,
        problem: &AttentionProblem,
        tensors: &GpuTensors<'_>,
        probs: Option<&wgpu::Buffer>,
    ) -> Result<(Kernel, Vec<Command>)> {
        let no_mask = self.scratch(Scratch::NoMask, 4);
        let lse_scratch;
        let lse = match tensors.lse {
            Some(lse) => lse,
            None => {
                lse_scratch = self.scratch(Scratch::Lse, 4 * problem.lse_len() as u64);
                &lse_scratch
            }
        };
        let (aux, extras, mut commands) = self.gather_aux(problem, tensors)?;
        let bindings = three_stage::Bindings {
            q: tensors.q,
            k: tensors.k,
            v: tensors.v,
            mask: tensors.mask.unwrap_or(&no_mask),
            out: tensors.out,
            lse,
            probs,
            aux: &aux,
            extras,
        };
        let resolved = kernel.resolve(problem, self);
        match resolved {
            kernel @ (Kernel::Flash
            | Kernel::FlashTiled
            | Kernel::FlashRows
            | Kernel::FlashDecode
            | Kernel::FlashSubgroup) => {
                if probs.is_some() {
                    return Err(Error::Unsupported {
                        kernel: kernel.name(),
                        what: "returning attention probabilities".to_string(),
                        fix: "use Kernel::ThreeStage, which stores them",
                    });
                }
                commands.extend(flash::commands(self, kernel, problem, &bindings)?);
            }
            Kernel::ThreeStage | Kernel::Auto => {
                commands.extend(three_stage::commands(self, problem, &bindings)?);
            }
        }
        Ok((resolved, commands))
    }

    /// Returns the scratch buffer for the optional small tensors in the order of `aux` in
    /// `shaders/params.wgsl`, the `extras` bits that mark which are present, and the copies that
    /// fill it.
    fn gather_aux(
        &self,
        problem: &AttentionProblem,
        tensors: &GpuTensors<'_>,
    ) -> Result<(wgpu::Buffer, u32, Vec<Command>)> {
        let s = &problem.shape;
        let layout = AuxLayout::new(s.heads, s.batch);
        let aux = self.scratch(Scratch::Aux, 4 * layout.len as u64);
        let parts = [
            (
                "alibi_slopes",
                tensors.alibi_slopes,
                layout.alibi,
                s.heads,
                EXTRA_ALIBI,
            ),
            ("sinks", tensors.sinks, layout.sinks, s.heads, EXTRA_SINKS),
            (
                "kv_seq_lens",
                tensors.kv_seq_lens,
                layout.kv_lens,
                s.batch,
                EXTRA_KV_LENS,
            ),
            (
                "cu_seqlens_q",
                tensors.cu_seqlens_q,
                layout.cu_q,
                s.batch + 1,
                EXTRA_PACKED,
            ),
            (
                "cu_seqlens_kv",
                tensors.cu_seqlens_kv,
                layout.cu_kv,
                s.batch + 1,
                EXTRA_PACKED,
            ),
        ];
        let mut extras = 0;
        let mut copies = Vec::new();
        for (tensor, buffer, offset, len, bit) in parts {
            let Some(buffer) = buffer else { continue };
            if !buffer.usage().contains(wgpu::BufferUsages::COPY_SRC) {
                return Err(Error::BufferUsage {
                    tensor,
                    missing: wgpu::BufferUsages::COPY_SRC,
                });
            }
            copies.push(Command::Copy {
                from: buffer.clone(),
                from_offset: 0,
                to: aux.clone(),
                to_offset: 4 * offset as u64,
                size: 4 * len as u64,
            });
            extras |= bit;
        }
        Ok((aux, extras, copies))
    }

    fn check_bindings(&self, problem: &AttentionProblem) -> Result<()> {
        let limits = self.limits();
        let element = problem.dtype.bytes();
        let [q, k, v, out] = problem.spans();
        check_binding(limits, "tensor `q`", q, element, SPLIT_ROWS_FIX)?;
        check_binding(limits, "tensor `k`", k, element, SPLIT_KEYS_FIX)?;
        check_binding(limits, "tensor `v`", v, element, SPLIT_KEYS_FIX)?;
        check_binding(limits, "tensor `out`", out, element, SPLIT_ROWS_FIX)?;
        check_binding(
            limits,
            "tensor `mask`",
            problem.mask_len(),
            4,
            SPLIT_ROWS_FIX,
        )?;
        Ok(())
    }
}

/// Rejects a written buffer (`out`, `lse`) that is also bound as another tensor, which wgpu
/// would report as a usage conflict.
fn check_aliases(tensors: &GpuTensors<'_>) -> Result<()> {
    let bound = [
        ("q", Some(tensors.q)),
        ("k", Some(tensors.k)),
        ("v", Some(tensors.v)),
        ("mask", tensors.mask),
        ("alibi_slopes", tensors.alibi_slopes),
        ("sinks", tensors.sinks),
        ("kv_seq_lens", tensors.kv_seq_lens),
        ("cu_seqlens_q", tensors.cu_seqlens_q),
        ("cu_seqlens_kv", tensors.cu_seqlens_kv),
        ("out", Some(tensors.out)),
        ("lse", tensors.lse),
    ];
    for (written, buffer) in [("out", Some(tensors.out)), ("lse", tensors.lse)] {
        let Some(buffer) = buffer else { continue };
        let alias = bound
            .iter()
            .find(|(other, candidate)| *other != written && *candidate == Some(buffer));
        if let Some(&(other, _)) = alias {
            return Err(Error::BufferAlias { written, other });
        }
    }
    Ok(())
}

/// Raw views of inputs of any element type, for uploading.
fn bytes_of_inputs<'a, T: bytemuck::Pod>(
    inputs: &AttentionInputs<'a, T>,
) -> AttentionInputs<'a, u8> {
    inputs.with_tensors(
        bytemuck::cast_slice(inputs.q),
        bytemuck::cast_slice(inputs.k),
        bytemuck::cast_slice(inputs.v),
    )
}

fn check_buffer(
    tensor: &'static str,
    buffer: &wgpu::Buffer,
    expected: usize,
    shape: &str,
    element_bytes: usize,
) -> Result<()> {
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::BufferUsage {
            tensor,
            missing: wgpu::BufferUsages::STORAGE,
        });
    }
    let size = buffer.size();
    let needed = (expected * element_bytes) as u64;
    if size < needed {
        return Err(Error::BufferTooSmall {
            tensor,
            size,
            needed,
            shape: shape.to_string(),
            element_bytes,
        });
    }
    if !size.is_multiple_of(4) {
        return Err(Error::UnalignedBuffer { tensor, size });
    }
    Ok(())
}

/// What a host-slice call reads back.
struct HostResult {
    /// The output's raw bytes, in the problem's dtype.
    out_bytes: Vec<u8>,
    lse: Vec<f32>,
    /// The attention probabilities, when requested.
    probs: Option<Vec<f32>>,
}

/// Pads `bytes` with zeros to a multiple of 4, the granularity of storage bindings.
fn padded(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if bytes.len().is_multiple_of(4) {
        std::borrow::Cow::Borrowed(bytes)
    } else {
        let mut owned = bytes.to_vec();
        owned.resize(bytes.len().next_multiple_of(4), 0);
        std::borrow::Cow::Owned(owned)
    }
}

fn copy_to_staging(
    device: &wgpu::Device,
    encoder: &mut wgpu::CommandEncoder,
    source: &wgpu::Buffer,
) -> wgpu::Buffer {
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("wgpu-attention read-back"),
        size: source.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    encoder.copy_buffer_to_buffer(source, 0, &staging, 0, source.size());
    staging
}

/// Maps `staging`, waits for the device and copies its bytes out.
pub(crate) fn read_back(device: &wgpu::Device, staging: &wgpu::Buffer) -> Result<Vec<u8>> {
    let slice = staging.slice(..);
    let (sender, receiver) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |result| {
        // The receiver outlives the wait below, so a failed send cannot happen.
        let _ = sender.send(result);
    });
    device
        .poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: None,
        })
        .map_err(|error| Error::ReadBack(error.to_string()))?;
    receiver
        .recv()
        .map_err(|error| Error::ReadBack(error.to_string()))?
        .map_err(|error| Error::ReadBack(error.to_string()))?;
    let view = slice
        .get_mapped_range()
        .map_err(|error| Error::ReadBack(error.to_string()))?;
    let data = view.to_vec();
    drop(view);
    staging.unmap();
    Ok(data)
}
