//! Entry points: host-slice calls that upload, run and read back, and a recording call that
//! works on the caller's buffers inside the caller's command encoder.

use wgpu::util::DeviceExt;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::kernels::{check_binding, flash, three_stage};
use crate::problem::{AttentionInputs, AttentionProblem, Dtype, check_len, check_mask};
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
    /// Memory grows with the inputs only. Runs [`Kernel::FlashRows`] on CPU adapters where it
    /// supports the head dim, [`Kernel::FlashTiled`] otherwise.
    Flash,
    /// The fused kernel's tiled program: blocks of key lanes × row lanes sharing a Q block.
    FlashTiled,
    /// The fused kernel's row program: one query row per invocation, head dims up to 128.
    FlashRows,
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
            "three-stage" => Some(Kernel::ThreeStage),
            _ => None,
        }
    }

    /// Returns the kernel that runs `problem` on `context`'s device: [`Kernel::Auto`] resolves
    /// to a concrete kernel and [`Kernel::Flash`] to the fused program it picks
    /// ([`Kernel::FlashRows`] or [`Kernel::FlashTiled`]). Other kernels return themselves, and so
    /// does `Flash` when no fused program can run the problem.
    pub fn resolve(self, problem: &AttentionProblem, context: &Context) -> Kernel {
        let fused_program = || {
            flash::plan(context, Kernel::Flash, problem)
                .ok()
                .map(|plan| match plan.variant {
                    flash::FlashVariant::Rows(_) => Kernel::FlashRows,
                    flash::FlashVariant::Tiled(_) => Kernel::FlashTiled,
                })
        };
        match self {
            Kernel::Flash => fused_program().unwrap_or(Kernel::Flash),
            Kernel::Auto => {
                let on_cpu = context.adapter_info().device_type == wgpu::DeviceType::Cpu;
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
/// mask stays f32 because `-inf` and large biases need its range.
#[derive(Clone, Copy, Debug)]
pub struct AttentionInputsF16<'a> {
    /// Queries, `[batch, heads, seq_q, head_dim]`.
    pub q: &'a [f16],
    /// Keys, `[batch, kv_heads, seq_kv, head_dim]`.
    pub k: &'a [f16],
    /// Values, `[batch, kv_heads, seq_kv, head_dim]`.
    pub v: &'a [f16],
    /// Additive mask, `[mask_batch, mask_heads, seq_q, seq_kv]`, when the problem has one.
    pub mask: Option<&'a [f32]>,
}

impl AttentionInputsF16<'_> {
    /// Checks every slice length against the problem.
    pub fn validate(&self, problem: &AttentionProblem) -> Result<()> {
        let s = &problem.shape;
        check_len("q", self.q.len(), &s.q_dims())?;
        check_len("k", self.k.len(), &s.kv_dims())?;
        check_len("v", self.v.len(), &s.kv_dims())?;
        check_mask(problem, self.mask.map(<[f32]>::len))
    }
}

/// Output of [`Context::attention_f16`].
#[derive(Clone, Debug)]
pub struct AttentionOutputF16 {
    /// Attention output, `[batch, heads, seq_q, head_dim]`, rounded to f16.
    pub out: Vec<f16>,
    /// Natural-log log-sum-exp of each row, `[batch, heads, seq_q]`, in f32.
    pub lse: Vec<f32>,
}

/// Output of a host-slice call.
#[derive(Clone, Debug)]
pub struct AttentionOutput {
    /// Attention output, `[batch, heads, seq_q, head_dim]`.
    pub out: Vec<f32>,
    /// Natural-log log-sum-exp of each row's scaled, masked scores, `[batch, heads, seq_q]`;
    /// `-inf` for a fully masked row.
    pub lse: Vec<f32>,
}

/// The caller's GPU buffers for [`Context::record`], each used whole from offset 0.
///
/// Inputs need [`wgpu::BufferUsages::STORAGE`]; `out` and `lse` are written by the kernels.
#[derive(Clone, Copy, Debug)]
pub struct GpuTensors<'a> {
    /// Queries, `[batch, heads, seq_q, head_dim]`, f32 or f16 as the problem's dtype says.
    pub q: &'a wgpu::Buffer,
    /// Keys, `[batch, kv_heads, seq_kv, head_dim]`, in the problem's dtype.
    pub k: &'a wgpu::Buffer,
    /// Values, `[batch, kv_heads, seq_kv, head_dim]`, in the problem's dtype.
    pub v: &'a wgpu::Buffer,
    /// Additive mask, `[mask_batch, mask_heads, seq_q, seq_kv]` f32, when the problem has one.
    pub mask: Option<&'a wgpu::Buffer>,
    /// Output, `[batch, heads, seq_q, head_dim]`, in the problem's dtype.
    pub out: &'a wgpu::Buffer,
    /// Log-sum-exp output, `[batch, heads, seq_q]` f32; when `None` the kernels write it to a
    /// scratch buffer.
    pub lse: Option<&'a wgpu::Buffer>,
}

impl Context {
    /// Computes attention on the GPU from host slices and returns the output,
    /// `[batch, heads, seq_q, head_dim]`.
    ///
    /// Supports head dims 1 to [`crate::MAX_HEAD_DIM`], grouped-query attention, both causal
    /// alignments and an additive mask broadcast over batch and heads. Blocks until the result is
    /// read back.
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
        let result = self.run_host(
            kernel,
            problem,
            [
                bytemuck::cast_slice(inputs.q),
                bytemuck::cast_slice(inputs.k),
                bytemuck::cast_slice(inputs.v),
            ],
            inputs.mask,
            with_probs,
        )?;
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
    /// f32 kernels run, and the output is rounded to f16; a warning is logged.
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
            log::warn!(
                "the device lacks SHADER_F16; converting f16 inputs to f32 on the host and the \
                 output back to f16"
            );
            let widen = |data: &[f16]| data.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
            let (q, k, v) = (widen(inputs.q), widen(inputs.k), widen(inputs.v));
            let f32_inputs = AttentionInputs {
                q: &q,
                k: &k,
                v: &v,
                mask: inputs.mask,
            };
            let output =
                self.attention_with(kernel, &problem.with_dtype(Dtype::F32), &f32_inputs)?;
            let out = output.out.iter().map(|&x| f16::from_f32(x)).collect();
            return Ok(AttentionOutputF16 {
                out,
                lse: output.lse,
            });
        }
        let result = self.run_host(
            kernel,
            &problem,
            [
                bytemuck::cast_slice(inputs.q),
                bytemuck::cast_slice(inputs.k),
                bytemuck::cast_slice(inputs.v),
            ],
            inputs.mask,
            false,
        )?;
        Ok(AttentionOutputF16 {
            out: bytemuck::pod_collect_to_vec(&result.out_bytes),
            lse: result.lse,
        })
    }

    /// Uploads Q, K and V (raw bytes of the problem's dtype) and the mask, runs `kernel` and
    /// returns the output's raw bytes and the log-sum-exp.
    fn run_host(
        &self,
        kernel: Kernel,
        problem: &AttentionProblem,
        [q, k, v]: [&[u8]; 3],
        mask: Option<&[f32]>,
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

        let storage = |label: &str, data: &[u8]| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: data,
                usage: wgpu::BufferUsages::STORAGE,
            })
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
        let q = storage("wgpu-attention q", &padded(q));
        let k = storage("wgpu-attention k", &padded(k));
        let v = storage("wgpu-attention v", &padded(v));
        let mask = mask.map(|mask| storage("wgpu-attention mask", bytemuck::cast_slice(mask)));
        let out = output("wgpu-attention out", s.q_len() * element);
        let lse = output("wgpu-attention lse", 4 * s.lse_len());

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
        };
        let probs = with_probs.then(|| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("wgpu-attention probs"),
                size: 4 * probs_len as u64,
                usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        });
        self.record_inner(kernel, problem, &mut encoder, &tensors, probs.as_ref())?;
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
        let mut out_bytes = out_host?;
        out_bytes.truncate(s.q_len() * element);
        Ok(HostResult {
            out_bytes,
            lse: bytemuck::pod_collect_to_vec(&lse_host?),
            probs: probs_host?.map(|bytes| bytemuck::pod_collect_to_vec(&bytes)),
        })
    }

    /// Records attention into the caller's `encoder`, reading and writing the caller's buffers,
    /// with no read-back. Submit the encoder to run it.
    ///
    /// Scratch buffers are created per call and released once the submitted work completes.
    ///
    /// # Errors
    ///
    /// An invalid problem, buffers smaller than the problem needs or without
    /// [`wgpu::BufferUsages::STORAGE`], a mask buffer given without a mask in the problem (or the
    /// reverse), or a tensor larger than the device's storage binding limit.
    pub fn record(
        &self,
        kernel: Kernel,
        problem: &AttentionProblem,
        encoder: &mut wgpu::CommandEncoder,
        tensors: &GpuTensors<'_>,
    ) -> Result<()> {
        self.record_inner(kernel, problem, encoder, tensors, None)
    }

    /// Records as [`Context::record`] does, and when `probs` is given also copies the attention
    /// probabilities into it, which only the three-stage kernel has.
    fn record_inner(
        &self,
        kernel: Kernel,
        problem: &AttentionProblem,
        encoder: &mut wgpu::CommandEncoder,
        tensors: &GpuTensors<'_>,
        probs: Option<&wgpu::Buffer>,
    ) -> Result<()> {
        problem.validate()?;
        self.check_bindings(problem)?;
        let s = &problem.shape;
        if problem.dtype == Dtype::F16 && !self.features().contains(wgpu::Features::SHADER_F16) {
            return Err(Error::MissingFeature {
                feature: "SHADER_F16",
                what: "f16 tensors in GPU buffers",
                fix: "convert the tensors to f32, or call attention_f16, which converts on the host",
            });
        }
        let element = problem.dtype.bytes();
        check_buffer("q", tensors.q, &s.q_dims(), element)?;
        check_buffer("k", tensors.k, &s.kv_dims(), element)?;
        check_buffer("v", tensors.v, &s.kv_dims(), element)?;
        check_buffer("out", tensors.out, &s.q_dims(), element)?;
        if let Some(lse) = tensors.lse {
            check_buffer("lse", lse, &[s.batch, s.heads, s.seq_q], 4)?;
        }
        match (problem.mask_dims(), tensors.mask) {
            (Some(dims), Some(mask)) => check_buffer("mask", mask, &dims, 4)?,
            (None, None) => {}
            (Some(_), None) => {
                return Err(Error::MaskMismatch(
                    "the problem has a mask shape but no mask buffer was given",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::MaskMismatch(
                    "a mask buffer was given but the problem has no mask shape; call \
                     AttentionProblem::with_mask",
                ));
            }
        }

        let device = self.device();
        let placeholder = |label: &str, elements: usize| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 4 * elements as u64,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let no_mask = placeholder("wgpu-attention no mask", 1);
        let lse_scratch;
        let lse = match tensors.lse {
            Some(lse) => lse,
            None => {
                lse_scratch = placeholder("wgpu-attention lse", s.lse_len());
                &lse_scratch
            }
        };
        let bindings = three_stage::Bindings {
            q: tensors.q,
            k: tensors.k,
            v: tensors.v,
            mask: tensors.mask.unwrap_or(&no_mask),
            out: tensors.out,
            lse,
            probs,
        };
        match kernel.resolve(problem, self) {
            kernel @ (Kernel::Flash | Kernel::FlashTiled | Kernel::FlashRows) => {
                if probs.is_some() {
                    return Err(Error::Unsupported {
                        kernel: kernel.name(),
                        what: "returning attention probabilities".to_string(),
                        fix: "use Kernel::ThreeStage, which stores them",
                    });
                }
                flash::record(self, kernel, problem, encoder, &bindings)
            }
            Kernel::ThreeStage | Kernel::Auto => {
                three_stage::record(self, problem, encoder, &bindings)
            }
        }
    }

    fn check_bindings(&self, problem: &AttentionProblem) -> Result<()> {
        let s = &problem.shape;
        let limits = self.limits();
        let element = problem.dtype.bytes();
        check_binding(limits, "q", s.q_len(), element)?;
        check_binding(limits, "k", s.kv_len(), element)?;
        check_binding(limits, "v", s.kv_len(), element)?;
        check_binding(limits, "mask", problem.mask_len(), 4)?;
        Ok(())
    }
}

fn check_buffer(
    tensor: &'static str,
    buffer: &wgpu::Buffer,
    dims: &[usize],
    element_bytes: usize,
) -> Result<()> {
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::BufferUsage {
            tensor,
            missing: wgpu::BufferUsages::STORAGE,
        });
    }
    let expected: usize = dims.iter().product();
    let actual = buffer.size() as usize / element_bytes;
    if actual < expected {
        return Err(Error::LengthMismatch {
            tensor,
            expected,
            actual,
            shape: format!("{dims:?}"),
        });
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
