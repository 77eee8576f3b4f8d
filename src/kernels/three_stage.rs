//! The three-stage path: scores, softmax, then probabilities times values, each its own dispatch.
//!
//! The score matrix is materialized in a scratch buffer. To bound its size, the flattened
//! (batch, head) pairs are processed in chunks whose score matrices fit one storage binding and
//! [`SCORES_BUDGET_BYTES`]; one (batch, head) whose matrix alone exceeds the binding limit is
//! rejected with [`Error::ExceedsLimit`].

use std::sync::Arc;

use crate::context::{Context, Pipeline, PipelineKey};
use crate::error::{Error, Result};
use crate::kernels::tiling::ThreeStageTiles;
use crate::kernels::{
    Command, KernelParams, THREE_STAGE_STORAGE_BUFFERS, check_loop_cap, check_storage_buffers,
    compile, grid_dispatches, max_binding_bytes,
};
use crate::problem::{AttentionProblem, Dtype};

const SCORES_WGSL: &str = include_str!("../../shaders/scores.wgsl");
const SOFTMAX_WGSL: &str = include_str!("../../shaders/softmax.wgsl");
const PROBS_V_WGSL: &str = include_str!("../../shaders/probs_v.wgsl");

/// Largest score scratch buffer one call allocates, unless a single (batch, head) needs more.
/// Larger chunks only save dispatches; 256 MiB already holds 8 heads of 4096 × 2048 scores.
pub const SCORES_BUDGET_BYTES: u64 = 256 << 20;

/// Buffers one three-stage call reads and writes.
pub(crate) struct Bindings<'a> {
    pub q: &'a wgpu::Buffer,
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    /// The mask, or a one-element placeholder when the problem has none.
    pub mask: &'a wgpu::Buffer,
    pub out: &'a wgpu::Buffer,
    pub lse: &'a wgpu::Buffer,
    /// Where to copy the attention probabilities, `[batch, heads, seq_q, seq_kv]`, when
    /// requested; only the three-stage kernel has them.
    pub probs: Option<&'a wgpu::Buffer>,
    /// Per-head and per-sequence values, laid out by `AuxLayout`.
    pub aux: &'a wgpu::Buffer,
    /// `EXTRA_*` bits saying which parts of `aux` are present.
    pub extras: u32,
}

/// (batch, head) pairs whose score matrices are processed together, given the device limits.
///
/// # Errors
///
/// [`Error::ExceedsLimit`] when one (batch, head)'s score matrix exceeds a storage binding.
pub(crate) fn heads_per_chunk(problem: &AttentionProblem, limits: &wgpu::Limits) -> Result<usize> {
    let s = &problem.shape;
    let head_bytes = 4 * s.scores_per_head() as u64;
    let limit = max_binding_bytes(limits);
    if head_bytes > limit {
        return Err(Error::ExceedsLimit {
            what: format!(
                "the three-stage kernel's score matrix of one head ({} × {} f32 values)",
                s.seq_q, s.seq_kv
            ),
            value: head_bytes,
            limit_name: "max_storage_buffer_binding_size",
            limit,
            fix: "use a shorter seq_q or seq_kv, or split the queries into several calls",
        });
    }
    let budget = limit.min(SCORES_BUDGET_BYTES).max(head_bytes);
    let by_memory = (budget / head_bytes) as usize;
    let by_grid = limits.max_compute_workgroups_per_dimension as usize;
    Ok(by_memory.min(by_grid).min(s.batch * s.heads).max(1))
}

/// Checks that the three-stage kernel can run `problem` on `context`'s device, and returns its
/// tiles and the (batch, head) pairs per chunk.
pub(crate) fn check(
    context: &Context,
    problem: &AttentionProblem,
) -> Result<(ThreeStageTiles, usize)> {
    check_storage_buffers(context, "three-stage", THREE_STAGE_STORAGE_BUFFERS)?;
    let tiles = ThreeStageTiles::choose(problem, context.limits());
    let chunk = heads_per_chunk(problem, context.limits())?;
    check_loop_iterations(context, problem, &tiles)?;
    Ok((tiles, chunk))
}

/// Builds a pass of the three stages for each chunk of (batch, head) pairs, each followed by the
/// copy of its probabilities when they are requested.
pub(crate) fn commands(
    context: &Context,
    problem: &AttentionProblem,
    bindings: &Bindings<'_>,
) -> Result<Vec<Command>> {
    let (tiles, chunk) = check(context, problem)?;
    let device = context.device();

    let (scores_pipeline, softmax_pipeline, probs_v_pipeline) =
        pipelines(context, problem.dtype, &tiles)?;

    let s = &problem.shape;
    let total_heads = s.batch * s.heads;
    let scores = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("wgpu-attention scores"),
        size: 4 * (chunk * s.scores_per_head()) as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let base = KernelParams::new(problem, bindings.extras);
    let output_tile = tiles.output_tile();

    let mut commands = Vec::new();
    for first in (0..total_heads).step_by(chunk) {
        let mut dispatches = Vec::new();
        let heads = chunk.min(total_heads - first) as u32;
        let params = KernelParams {
            bh_offset: first as u32,
            ..base
        };
        let grids = [
            [
                (s.seq_kv as u32).div_ceil(output_tile),
                (s.seq_q as u32).div_ceil(output_tile),
                heads,
            ],
            [s.seq_q as u32, 1, heads],
            [
                (s.head_dim_v as u32).div_ceil(output_tile),
                (s.seq_q as u32).div_ceil(output_tile),
                heads,
            ],
        ];
        let stages: [(&Arc<Pipeline>, Vec<&wgpu::Buffer>); 3] = [
            (
                &scores_pipeline,
                vec![bindings.q, bindings.k, bindings.mask, &scores, bindings.aux],
            ),
            (&softmax_pipeline, vec![&scores, bindings.lse, bindings.aux]),
            (
                &probs_v_pipeline,
                vec![&scores, bindings.v, bindings.out, bindings.aux],
            ),
        ];
        log::trace!("three-stage chunk from head {first}");
        for ((pipeline, buffers), grid) in stages.into_iter().zip(grids) {
            dispatches.extend(grid_dispatches(
                context,
                pipeline,
                "wgpu-attention three-stage",
                grid,
                &params,
                &buffers,
            ));
        }
        commands.push(Command::Pass {
            label: "wgpu-attention three-stage",
            dispatches,
        });
        // After the softmax stage the scratch holds this chunk's probabilities.
        if let Some(probs) = bindings.probs {
            commands.push(Command::Copy {
                from: scores.clone(),
                from_offset: 0,
                to: probs.clone(),
                to_offset: 4 * (first * s.scores_per_head()) as u64,
                size: 4 * (heads as usize * s.scores_per_head()) as u64,
            });
        }
    }
    Ok(commands)
}

fn pipelines(
    context: &Context,
    dtype: Dtype,
    tiles: &ThreeStageTiles,
) -> Result<(Arc<Pipeline>, Arc<Pipeline>, Arc<Pipeline>)> {
    let side = tiles.workgroup_side;
    let scores = cached(
        context,
        dtype,
        "scores.wgsl",
        SCORES_WGSL,
        vec![
            ("WG_Q", side),
            ("WG_KV", side),
            ("TILE_D", tiles.reduction_tile),
        ],
    )?;
    let softmax = cached(
        context,
        dtype,
        "softmax.wgsl",
        SOFTMAX_WGSL,
        vec![("WG", tiles.softmax_workgroup)],
    )?;
    let probs_v = cached(
        context,
        dtype,
        "probs_v.wgsl",
        PROBS_V_WGSL,
        vec![
            ("WG_Q", side),
            ("WG_D", side),
            ("TILE_KV", tiles.reduction_tile),
        ],
    )?;
    Ok((scores, softmax, probs_v))
}

fn cached(
    context: &Context,
    dtype: Dtype,
    shader: &'static str,
    program: &'static str,
    constants: Vec<(&'static str, u32)>,
) -> Result<Arc<Pipeline>> {
    context.pipeline(
        PipelineKey {
            shader,
            dtype,
            constants,
            bounds_checks: true,
        },
        |device, key| compile(device, program, key),
    )
}

/// Rejects problems whose output stage would exceed llvmpipe's loop cap.
///
/// The output stage's key loop runs `seq_kv / TILE_KV` times per invocation, each with two
/// staging loops and a loop over the tile's keys; its other loops have constant bounds and are
/// unrolled. llvmpipe counts every pass through a loop, the final one that ends it included,
/// so each step counts 4 passes more than the three loops' iterations: 28 at 64 × 16 staging
/// tiles. That matches lavapipe (Mesa 22.3), where 37,440 keys ran correctly and 37,456 did
/// not (2,341 tiles of 28), at head dims 37 to 128, in f32 and f16, on Vulkan and GL. The
/// count is taken 10 % larger, and the output stores after the loop add at most 25.
fn check_loop_iterations(
    context: &Context,
    problem: &AttentionProblem,
    tiles: &ThreeStageTiles,
) -> Result<()> {
    let tile_keys = u64::from(tiles.reduction_tile);
    let output_tile = u64::from(tiles.output_tile());
    let invocations = u64::from(tiles.workgroup_side * tiles.workgroup_side);
    let staging = 2 * (output_tile * tile_keys).div_ceil(invocations);
    let per_tile = 4 + staging + tile_keys;
    let per_tile = per_tile + per_tile.div_ceil(10);
    let iterations = (problem.shape.seq_kv as u64).div_ceil(tile_keys) * per_tile + 25;
    check_loop_cap(
        context,
        "three-stage",
        problem,
        iterations,
        "use the fused kernel (Kernel::Flash, `--kernel flash` in the command-line tool), split \
         the keys into several calls and merge the results by their log-sum-exp, or use a GPU \
         adapter",
    )
}
