//! The fused kernel: one dispatch per call, memory proportional to the inputs.

use crate::context::{Context, PipelineKey};
use crate::error::{Error, Result};
use crate::kernels::three_stage::{Bindings, ThreeStageParams};
use crate::kernels::tiling::{FLASH_ROWS, FlashTiles};
use crate::kernels::{bind_buffers, check_loop_cap, compile, split_grid, uniform};
use crate::problem::AttentionProblem;

const PARAMS_WGSL: &str = include_str!("../../shaders/params.wgsl");
const FLASH_WGSL: &str = include_str!("../../shaders/flash.wgsl");

/// Chooses the fused kernel's tile sizes for `problem`, or returns the error that explains why
/// it cannot run.
pub(crate) fn tiles(context: &Context, problem: &AttentionProblem) -> Result<FlashTiles> {
    let limits = context.limits();
    let tiles = FlashTiles::choose(problem, limits).ok_or_else(|| {
        let smallest = FlashTiles {
            key_lanes: 16,
            row_lanes: 1,
            d_cols: (problem.shape.head_dim as u32).div_ceil(16),
        };
        Error::ExceedsLimit {
            what: format!("the fused kernel at head_dim {}", problem.shape.head_dim),
            value: u64::from(smallest.workgroup_bytes()),
            limit_name: "max_compute_workgroup_storage_size",
            limit: u64::from(limits.max_compute_workgroup_storage_size),
            fix: "use Kernel::ThreeStage on this device",
        }
    })?;
    check_loop_cap(
        context,
        "flash",
        problem,
        loop_iterations(problem, &tiles),
        "use Kernel::ThreeStage or Kernel::Auto, or a GPU adapter",
    )?;
    Ok(tiles)
}

/// An upper estimate of the loop iterations one invocation runs.
///
/// Per key tile: the key loop itself, the K and V staging loops, the dot product over the padded
/// head dim for each row, and the softmax and P V loops over the tile's keys for each row. Loops
/// over `ROWS` and `D_COLS` are left out because the compiler unrolls them. On lavapipe at head
/// dim 64 the outputs stopped after about 356 iterations per tile at 64 rows per block and 478
/// at 4 rows, where this estimate gives 393 and 513.
fn loop_iterations(problem: &AttentionProblem, tiles: &FlashTiles) -> u64 {
    let d_pad = u64::from(tiles.key_lanes * tiles.d_cols);
    let lanes = u64::from(tiles.key_lanes);
    let rows = u64::from(FLASH_ROWS);
    let invocations = lanes * u64::from(tiles.row_lanes);
    let staging = 2 * (lanes * d_pad).div_ceil(invocations);
    let per_tile = 1 + staging + rows * d_pad + 2 * rows * lanes;
    let load_q = (u64::from(tiles.block_q()) * d_pad).div_ceil(invocations);
    (problem.shape.seq_kv as u64).div_ceil(lanes) * per_tile + load_q
}

/// Records the fused kernel into `encoder`.
pub(crate) fn record(
    context: &Context,
    problem: &AttentionProblem,
    encoder: &mut wgpu::CommandEncoder,
    bindings: &Bindings<'_>,
) -> Result<()> {
    let device = context.device();
    let limits = context.limits();
    let tiles = tiles(context, problem)?;
    let key = PipelineKey {
        shader: "flash.wgsl",
        constants: vec![
            ("WG_KV", tiles.key_lanes),
            ("WG_Q", tiles.row_lanes),
            ("D_COLS", tiles.d_cols),
        ],
    };
    let pipeline = context.pipeline(key, |device, key| {
        compile(device, &format!("{PARAMS_WGSL}\n{FLASH_WGSL}"), key)
    })?;

    let s = &problem.shape;
    let base = ThreeStageParams::new(problem);
    let grid = [
        (s.seq_q as u32).div_ceil(tiles.block_q()),
        1,
        (s.batch * s.heads) as u32,
    ];
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("wgpu-attention flash"),
        timestamp_writes: None,
    });
    pass.set_pipeline(&pipeline.pipeline);
    for part in split_grid(grid, limits.max_compute_workgroups_per_dimension) {
        let params = ThreeStageParams {
            group_offset: part.offset,
            ..base
        };
        let params_buffer = uniform(device, "wgpu-attention params", &params);
        let buffers = [
            &params_buffer,
            bindings.q,
            bindings.k,
            bindings.v,
            bindings.mask,
            bindings.out,
            bindings.lse,
        ];
        let bind_group = bind_buffers(device, &pipeline, "wgpu-attention flash", &buffers);
        pass.set_bind_group(0, &bind_group, &[]);
        log::trace!("flash dispatch {part:?} with {tiles:?}");
        pass.dispatch_workgroups(part.count[0], part.count[1], part.count[2]);
    }
    Ok(())
}
