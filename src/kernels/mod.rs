//! The WGSL programs and the host code that records their dispatches.

pub(crate) mod flash;
pub(crate) mod three_stage;
pub(crate) mod tiling;

use std::sync::Arc;

use wgpu::util::DeviceExt;

use crate::context::{Context, LLVMPIPE_MAX_LOOP_ITERATIONS, Pipeline, PipelineKey};
use crate::error::{Error, Result};
use crate::problem::{AttentionProblem, Dtype};

/// The uniform block `Params` of `shaders/params.wgsl`, field for field, shared by every program.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct KernelParams {
    pub batch: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub seq_q: u32,
    pub seq_kv: u32,
    pub head_dim: u32,
    pub causal: u32,
    pub has_mask: u32,
    pub mask_batch_stride: u32,
    pub mask_head_stride: u32,
    pub bh_offset: u32,
    pub scale: f32,
    pub group_offset: [u32; 3],
    pub keys_per_split: u32,
    pub kv_splits: u32,
    /// Soft-capping value, or 0 for none.
    pub softcap: f32,
    /// Sliding-window bounds, or -1 for an unbounded side.
    pub window_left: i32,
    pub window_right: i32,
    /// Strides over (batch, head, position), each followed by a scalar as in the WGSL block.
    pub q_strides: [u32; 3],
    pub head_dim_v: u32,
    pub k_strides: [u32; 3],
    pub lse_batch_stride: u32,
    pub v_strides: [u32; 3],
    pub lse_head_stride: u32,
    pub out_strides: [u32; 3],
    /// `EXTRA_*` bits: which parts of the `aux` buffer are present.
    pub extras: u32,
    /// Fused kernel only: the fewest keys per split of a sequence, and the multiple that a
    /// split's size is rounded up to (`split_keys` in the WGSL).
    pub min_keys_per_split: u32,
    pub split_align: u32,
    /// Rows of the packed Q and output, and of the packed K and V; 0 unless the sequences are
    /// packed. The programs cut a sequence whose offsets reach past them.
    pub packed_rows: u32,
    pub packed_keys: u32,
}

/// Bits of `KernelParams::extras`, as `EXTRA_*` in `shaders/params.wgsl`.
pub(crate) const EXTRA_ALIBI: u32 = 1;
pub(crate) const EXTRA_SINKS: u32 = 2;
pub(crate) const EXTRA_KV_LENS: u32 = 4;
pub(crate) const EXTRA_PACKED: u32 = 8;
/// Not a part of `aux`: the key lengths place the diagonals ([`crate::KeyLengths::Cache`]).
pub(crate) const EXTRA_LENS_PLACE_DIAGONAL: u32 = 16;

/// Word offsets of the parts of the `aux` buffer, in the order `shaders/params.wgsl` reads them.
pub(crate) struct AuxLayout {
    pub alibi: usize,
    pub sinks: usize,
    pub kv_lens: usize,
    pub cu_q: usize,
    pub cu_kv: usize,
    /// Words in all.
    pub len: usize,
}

impl AuxLayout {
    pub fn new(heads: usize, batch: usize) -> Self {
        let cu_q = 2 * heads + batch;
        Self {
            alibi: 0,
            sinks: heads,
            kv_lens: 2 * heads,
            cu_q,
            cu_kv: cu_q + batch + 1,
            len: cu_q + 2 * (batch + 1),
        }
    }
}

impl KernelParams {
    /// Returns the parameters of `problem` for a dispatch starting at head 0 with no grid
    /// offset, with the `aux` parts given by `extras`.
    pub fn new(problem: &AttentionProblem, extras: u32) -> Self {
        let s = &problem.shape;
        let (mask_batch_stride, mask_head_stride) = problem.mask_strides();
        let (lse_batch_stride, lse_head_stride) = problem.lse_strides();
        let strides = problem.strides();
        // check_binding keeps every span, and so every stride in use, within u32.
        let triple = |t: crate::problem::Strides| [t.batch as u32, t.head as u32, t.seq as u32];
        Self {
            batch: s.batch as u32,
            heads: s.heads as u32,
            kv_heads: s.kv_heads as u32,
            seq_q: s.seq_q as u32,
            seq_kv: s.seq_kv as u32,
            head_dim: s.head_dim as u32,
            causal: problem.causal.code(),
            has_mask: u32::from(problem.mask.is_some()),
            mask_batch_stride: mask_batch_stride as u32,
            mask_head_stride: mask_head_stride as u32,
            bh_offset: 0,
            scale: problem.scale() as f32,
            group_offset: [0; 3],
            keys_per_split: s.seq_kv as u32,
            kv_splits: 1,
            softcap: problem.softcap.map_or(0.0, |softcap| softcap as f32),
            // Problem::validate keeps both bounds within i32.
            window_left: problem.window.left.map_or(-1, |left| left as i32),
            window_right: problem.window.right.map_or(-1, |right| right as i32),
            q_strides: triple(strides.q),
            head_dim_v: s.head_dim_v as u32,
            k_strides: triple(strides.k),
            lse_batch_stride: lse_batch_stride as u32,
            v_strides: triple(strides.v),
            lse_head_stride: lse_head_stride as u32,
            out_strides: triple(strides.out),
            extras: if problem.key_lengths == crate::problem::KeyLengths::Cache {
                extras | EXTRA_LENS_PLACE_DIAGONAL
            } else {
                extras
            },
            min_keys_per_split: 0,
            split_align: 1,
            // Offsets are u32, so a larger total cuts no sequence and saturates. K and V may
            // broadcast one key row, so their total is not bounded by a binding.
            packed_rows: problem
                .packed
                .map_or(0, |p| u32::try_from(p.total_q).unwrap_or(u32::MAX)),
            packed_keys: problem
                .packed
                .map_or(0, |p| u32::try_from(p.total_kv).unwrap_or(u32::MAX)),
        }
    }
}

/// One dispatch of a grid that may have been split to fit the per-axis workgroup limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GridPart {
    /// Added to `@builtin(workgroup_id)` by the shader.
    pub offset: [u32; 3],
    /// Workgroups dispatched.
    pub count: [u32; 3],
}

/// One step of what an attention call records. The kernels build the whole list first, so that
/// [`Context::record`](crate::Context::record) can encode it at once and a
/// [`PreparedAttention`](crate::PreparedAttention) can keep it and encode it on every call.
pub(crate) enum Command {
    /// A copy from one buffer into another.
    Copy {
        from: wgpu::Buffer,
        from_offset: u64,
        to: wgpu::Buffer,
        to_offset: u64,
        size: u64,
    },
    /// A compute pass and its dispatches, in order.
    Pass {
        label: &'static str,
        dispatches: Vec<Dispatch>,
    },
}

/// One dispatch of a [`Command::Pass`], with the bind group of its buffers.
pub(crate) struct Dispatch {
    pub pipeline: Arc<Pipeline>,
    pub bind_group: wgpu::BindGroup,
    pub count: [u32; 3],
}

impl Dispatch {
    /// Binds `buffers` to `pipeline`'s bindings 0, 1 and so on, for a dispatch of `count`
    /// workgroups.
    pub fn new(
        device: &wgpu::Device,
        pipeline: &Arc<Pipeline>,
        label: &str,
        buffers: &[&wgpu::Buffer],
        count: [u32; 3],
    ) -> Self {
        Self {
            pipeline: pipeline.clone(),
            bind_group: bind_buffers(device, pipeline, label, buffers),
            count,
        }
    }
}

/// Builds the dispatches of `pipeline` over a grid of `groups` workgroups, split to the device's
/// per-axis limit. Each part binds a uniform of its own at binding 0: `params` with the part's
/// `group_offset`. `buffers` follow it from binding 1.
pub(crate) fn grid_dispatches(
    context: &Context,
    pipeline: &Arc<Pipeline>,
    label: &str,
    groups: [u32; 3],
    params: &KernelParams,
    buffers: &[&wgpu::Buffer],
) -> Vec<Dispatch> {
    let device = context.device();
    split_grid(
        groups,
        context.limits().max_compute_workgroups_per_dimension,
    )
    .into_iter()
    .map(|part| {
        log::trace!("{label} dispatch {part:?}");
        let params = KernelParams {
            group_offset: part.offset,
            ..*params
        };
        let params_buffer = uniform(device, "wgpu-attention params", &params);
        let mut all = vec![&params_buffer];
        all.extend_from_slice(buffers);
        Dispatch::new(device, pipeline, label, &all, part.count)
    })
    .collect()
}

/// Encodes `commands` into `encoder`.
pub(crate) fn encode(commands: &[Command], encoder: &mut wgpu::CommandEncoder) {
    for command in commands {
        match command {
            Command::Copy {
                from,
                from_offset,
                to,
                to_offset,
                size,
            } => encoder.copy_buffer_to_buffer(from, *from_offset, to, *to_offset, *size),
            Command::Pass { label, dispatches } => {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(label),
                    timestamp_writes: None,
                });
                let mut current: Option<&Arc<Pipeline>> = None;
                for dispatch in dispatches {
                    if !current.is_some_and(|pipeline| Arc::ptr_eq(pipeline, &dispatch.pipeline)) {
                        pass.set_pipeline(&dispatch.pipeline.pipeline);
                        current = Some(&dispatch.pipeline);
                    }
                    pass.set_bind_group(0, &dispatch.bind_group, &[]);
                    let [x, y, z] = dispatch.count;
                    pass.dispatch_workgroups(x, y, z);
                }
            }
        }
    }
}

/// Splits a grid of `groups` workgroups into dispatches of at most `max_per_axis` per axis.
pub(crate) fn split_grid(groups: [u32; 3], max_per_axis: u32) -> Vec<GridPart> {
    let ranges = groups.map(|total| {
        (0..total.div_ceil(max_per_axis))
            .map(|i| {
                let start = i * max_per_axis;
                (start, (total - start).min(max_per_axis))
            })
            .collect::<Vec<_>>()
    });
    let mut parts = Vec::new();
    for &(z0, nz) in &ranges[2] {
        for &(y0, ny) in &ranges[1] {
            for &(x0, nx) in &ranges[0] {
                parts.push(GridPart {
                    offset: [x0, y0, z0],
                    count: [nx, ny, nz],
                });
            }
        }
    }
    parts
}

const STORAGE_F32_WGSL: &str = include_str!("../../shaders/storage_f32.wgsl");
const STORAGE_F16_WGSL: &str = include_str!("../../shaders/storage_f16.wgsl");
const PARAMS_WGSL: &str = include_str!("../../shaders/params.wgsl");

/// Compiles `program` after the storage prelude of the key's dtype and the shared parameter
/// block, with the key's override constants, reporting shader and pipeline errors as
/// [`Error::Device`].
pub(crate) fn compile(device: &wgpu::Device, program: &str, key: &PipelineKey) -> Result<Pipeline> {
    let prelude = match key.dtype {
        Dtype::F32 => STORAGE_F32_WGSL,
        Dtype::F16 => STORAGE_F16_WGSL,
    };
    // A constant that the program declares as `override` is passed at pipeline creation. Any
    // other is declared as a `const` ahead of the program, so it may size private arrays.
    let mut declared = String::new();
    let mut overrides: Vec<(&str, f64)> = Vec::new();
    for &(name, value) in &key.constants {
        if program.contains(&format!("override {name}:")) {
            overrides.push((name, f64::from(value)));
        } else {
            declared.push_str(&format!("const {name}: u32 = {value}u;\n"));
        }
    }
    let source = format!("{prelude}\n{PARAMS_WGSL}\n{declared}{program}");
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    // Two of wgpu's default checks keep Mesa's NIR from unrolling the loops over private arrays,
    // which llvmpipe then indexes through memory, one load per SIMD lane:
    // - a counter in every loop that stops it after 2^64 iterations, so NIR cannot count the
    //   loop's iterations. It is off for every program. On lavapipe the decoding program ran
    //   1.5× slower with it (B1 H8 S1024 D64).
    // - a clamp on every dynamic array index, so NIR no longer finds the loop counter as the
    //   index. It is off where `key.bounds_checks` is false: the decoding and subgroup programs
    //   on CPU adapters. The decoding program then ran 2× faster at the same shape, and the
    //   subgroup program 2.1 to 2.3× faster at B1 H8 S2048 D64.
    let checks = wgpu::ShaderRuntimeChecks {
        force_loop_bounding: false,
        bounds_checks: key.bounds_checks,
        ..wgpu::ShaderRuntimeChecks::checked()
    };
    // SAFETY: every loop in these programs is finite. Each `for` loop steps a counter by a
    // positive constant (or halves it, in softmax.wgsl) towards a bound set by the problem's
    // shape, which validation keeps far below u32::MAX, so no counter can wrap past its bound.
    // Without bounds checks, `flash_decode.wgsl` and `flash_subgroup.wgsl` stay within their
    // arrays: they index the private ones with loop counters below their lengths, and the
    // workgroup ones with slots of a row below ROWS and an invocation below the workgroup size,
    // and with vec4 columns below D4V. Their storage buffer offsets come from the validated
    // shape and strides, with every key read clamped below seq_kv. The offsets of packed
    // sequences, which a GPU caller passes unchecked, are clamped to the packed tensors' rows
    // (`sequence` in params.wgsl). llvmpipe also checks every storage buffer access against the
    // buffer's size.
    let module = unsafe {
        device.create_shader_module_trusted(
            wgpu::ShaderModuleDescriptor {
                label: Some(key.shader),
                source: wgpu::ShaderSource::Wgsl(source.as_str().into()),
            },
            checks,
        )
    };
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(key.shader),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &overrides,
            // Every workgroup array is written before it is read.
            zero_initialize_workgroup_memory: false,
        },
        cache: None,
    });
    if let Some(source) = pollster::block_on(scope.pop()) {
        return Err(Error::Device {
            during: "pipeline creation",
            source,
        });
    }
    let layout = pipeline.get_bind_group_layout(0);
    Ok(Pipeline { pipeline, layout })
}

/// Storage buffers that the fused programs bind: Q, K, V, the mask, the output, the log-sum-exp,
/// the partial results and the small tensors.
pub(crate) const FLASH_STORAGE_BUFFERS: u32 = 8;

/// Storage buffers that the three-stage path binds at most, in its first stage: Q, K, the mask,
/// the scores and the small tensors.
pub(crate) const THREE_STAGE_STORAGE_BUFFERS: u32 = 5;

/// Checks that the device lets one shader stage bind the `needed` storage buffers of `kernel`.
pub(crate) fn check_storage_buffers(context: &Context, kernel: &str, needed: u32) -> Result<()> {
    let limit = context.limits().max_storage_buffers_per_shader_stage;
    if limit < needed {
        return Err(Error::ExceedsLimit {
            what: format!("the {kernel} kernel's storage buffers in one shader stage"),
            value: needed.into(),
            limit_name: "max_storage_buffers_per_shader_stage",
            limit: limit.into(),
            fix: "create the device with wgpu::Limits::default() or higher limits, which let \
                  every kernel bind its storage buffers",
        });
    }
    Ok(())
}

/// Creates a bind group whose binding `i` is the whole of `buffers[i]`.
pub(crate) fn bind_buffers(
    device: &wgpu::Device,
    pipeline: &Pipeline,
    label: &str,
    buffers: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
        .iter()
        .enumerate()
        .map(|(binding, buffer)| wgpu::BindGroupEntry {
            binding: binding as u32,
            resource: buffer.as_entire_binding(),
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout: &pipeline.layout,
        entries: &entries,
    })
}

/// Creates a uniform buffer holding `value`.
pub(crate) fn uniform<T: bytemuck::Pod>(
    device: &wgpu::Device,
    label: &str,
    value: &T,
) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::bytes_of(value),
        usage: wgpu::BufferUsages::UNIFORM,
    })
}

/// Rejects a kernel whose invocations would run more than [`LLVMPIPE_MAX_LOOP_ITERATIONS`] loop
/// iterations on llvmpipe, which would end the loops early and return a wrong result.
pub(crate) fn check_loop_cap(
    context: &Context,
    kernel: &'static str,
    problem: &AttentionProblem,
    iterations: u64,
    fix: &'static str,
) -> Result<()> {
    if !context.loop_iterations_capped() || iterations <= LLVMPIPE_MAX_LOOP_ITERATIONS {
        return Ok(());
    }
    Err(Error::Unsupported {
        kernel,
        what: format!(
            "seq_kv = {} at head_dim {} on llvmpipe: an invocation would run about {iterations} \
             loop iterations, over llvmpipe's cap of {LLVMPIPE_MAX_LOOP_ITERATIONS}, after which \
             it silently stops",
            problem.shape.seq_kv, problem.shape.head_dim
        ),
        fix,
    })
}

/// Returns the largest storage binding the device allows, in bytes.
pub(crate) fn max_binding_bytes(limits: &wgpu::Limits) -> u64 {
    limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size)
}

/// The fix for a query-side tensor (Q, the output or the mask) over the binding limit.
pub(crate) const SPLIT_ROWS_FIX: &str = "split the batch or the heads into several calls, or \
    the query rows (causal masks, windows and ALiBi then need adjusting to each part)";

/// The fix for K or V over the binding limit.
pub(crate) const SPLIT_KEYS_FIX: &str = "split the batch or the heads into several calls, or \
    the key range, and combine the calls' results with merge_partials (its documentation says \
    what each range's call needs)";

/// The fix for the split partial outputs over the binding limit, where the caller named one of
/// the fused programs.
pub(crate) const SPLIT_PARTIALS_FIX: &str = "use Kernel::Flash (flash in the CLI), which tries \
    the other fused programs, or split the batch or the heads into several calls, or the query \
    rows (causal masks, windows and ALiBi then need adjusting to each part)";

/// Checks that `what` (such as "tensor `q`"), `elements` values of `element_bytes` each, fits in
/// one storage binding. Returns [`Error::ExceedsLimit`] with `fix` where it does not.
pub(crate) fn check_binding(
    limits: &wgpu::Limits,
    what: &str,
    elements: usize,
    element_bytes: usize,
    fix: &'static str,
) -> Result<()> {
    let bytes = (element_bytes * elements) as u64;
    let limit = max_binding_bytes(limits);
    if bytes > limit {
        let limit_name = if limits.max_storage_buffer_binding_size <= limits.max_buffer_size {
            "max_storage_buffer_binding_size"
        } else {
            "max_buffer_size"
        };
        return Err(Error::ExceedsLimit {
            what: format!("{what} ({elements} values of {element_bytes} bytes)"),
            value: bytes,
            limit_name,
            limit,
            fix,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_grid_within_limit_is_one_part() {
        let parts = split_grid([3, 4, 5], 65_535);
        assert_eq!(
            parts,
            vec![GridPart {
                offset: [0, 0, 0],
                count: [3, 4, 5]
            }]
        );
    }

    #[test]
    fn split_grid_covers_every_group_once() {
        let parts = split_grid([10, 1, 7], 4);
        assert_eq!(parts.len(), 3 * 2);
        let mut seen = vec![0u32; 10 * 7];
        for part in &parts {
            assert!(part.count.iter().all(|&c| c <= 4));
            for z in part.offset[2]..part.offset[2] + part.count[2] {
                for x in part.offset[0]..part.offset[0] + part.count[0] {
                    seen[(z * 10 + x) as usize] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }
}
