//! The fused kernel: scores, online softmax and output in one pass per split of the key range,
//! plus a pass that merges the splits when there is more than one.
//!
//! Memory grows with the inputs and with `kv_splits × seq_q × head_dim` for the partial results,
//! never with `seq_q × seq_kv`.

use crate::context::{Context, LLVMPIPE_MAX_LOOP_ITERATIONS, PipelineKey};
use crate::error::{Error, Result};
use crate::kernels::three_stage::Bindings;
use crate::kernels::tiling::{FLASH_ROWS, FlashTiles};
use crate::kernels::{KernelParams, bind_buffers, check_binding, compile, split_grid, uniform};
use crate::problem::AttentionProblem;

const FLASH_WGSL: &str = include_str!("../../shaders/flash.wgsl");
const COMBINE_WGSL: &str = include_str!("../../shaders/combine.wgsl");

/// Workgroups below which the key range is split for parallelism, when each split keeps at
/// least [`MIN_KEYS_PER_SPLIT`] keys. Decoding one query over 32 heads gives 8 to 32 workgroups,
/// too few to fill a GPU.
const TARGET_WORKGROUPS: u64 = 128;
/// Fewest keys a split is given for parallelism, so the merge pass stays small.
const MIN_KEYS_PER_SPLIT: u64 = 512;

/// How one fused call is laid out: tile sizes and the split of the key range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlashPlan {
    pub tiles: FlashTiles,
    /// Keys per split, a multiple of the tile's keys.
    pub keys_per_split: u32,
    /// Splits of the key range; 1 means no merge pass.
    pub kv_splits: u32,
}

/// Plans the fused kernel for `problem`, or returns the error that explains why it cannot run.
pub(crate) fn plan(context: &Context, problem: &AttentionProblem) -> Result<FlashPlan> {
    let limits = context.limits();
    let s = &problem.shape;
    let tiles = FlashTiles::choose(problem, limits).ok_or_else(|| {
        let smallest = FlashTiles {
            key_lanes: 16,
            row_lanes: 1,
            keys_per_lane: 1,
            d_cols: (s.head_dim as u32).div_ceil(16),
        };
        Error::ExceedsLimit {
            what: format!("the fused kernel at head_dim {}", s.head_dim),
            value: u64::from(smallest.workgroup_bytes()),
            limit_name: "max_compute_workgroup_storage_size",
            limit: u64::from(limits.max_compute_workgroup_storage_size),
            fix: "use Kernel::ThreeStage on this device",
        }
    })?;

    let tile_kv = u64::from(tiles.tile_kv());
    let seq_kv = s.seq_kv as u64;
    let mut splits = 1;
    if context.loop_iterations_capped() {
        let budget = LLVMPIPE_MAX_LOOP_ITERATIONS - q_load_iterations(&tiles);
        let max_keys = (budget / tile_iterations(&tiles)) * tile_kv;
        splits = seq_kv.div_ceil(max_keys.max(tile_kv));
    }
    let workgroups = ((s.group_size() * s.seq_q) as u64).div_ceil(u64::from(tiles.block_q()))
        * (s.batch * s.kv_heads) as u64;
    if workgroups < TARGET_WORKGROUPS {
        let for_parallelism = TARGET_WORKGROUPS
            .div_ceil(workgroups)
            .min(seq_kv / MIN_KEYS_PER_SPLIT);
        splits = splits.max(for_parallelism);
    }
    let keys_per_split = seq_kv.div_ceil(splits.max(1)).div_ceil(tile_kv) * tile_kv;
    let kv_splits = seq_kv.div_ceil(keys_per_split);
    if kv_splits > 1 {
        check_binding(
            limits,
            "partial outputs of the key splits",
            kv_splits as usize * s.q_len(),
            4,
        )?;
    }
    Ok(FlashPlan {
        tiles,
        keys_per_split: keys_per_split as u32,
        kv_splits: kv_splits as u32,
    })
}

/// Returns an upper estimate of the loop iterations one invocation runs per key tile, for
/// llvmpipe's loop cap: the tile loop itself, the K and V staging loops, the dot products over
/// the padded head dim, and per row the loops over the lanes' maxima and over the tile's keys.
/// Loops over `ROWS`, `KEYS` and `D_COLS` have override bounds and are counted as unrolled
/// except where they enclose another loop.
fn tile_iterations(tiles: &FlashTiles) -> u64 {
    let invocations = u64::from(tiles.key_lanes * tiles.row_lanes);
    let staging = 2 * (u64::from(tiles.tile_kv() * tiles.d_pad())).div_ceil(invocations);
    let rows = u64::from(FLASH_ROWS);
    1 + staging + u64::from(tiles.d_pad()) + rows * u64::from(tiles.key_lanes + tiles.tile_kv())
}

fn q_load_iterations(tiles: &FlashTiles) -> u64 {
    let invocations = u64::from(tiles.key_lanes * tiles.row_lanes);
    u64::from(tiles.block_q() * tiles.d_pad()).div_ceil(invocations)
}

/// Records the fused kernel, and the merge pass when the key range is split, into `encoder`.
pub(crate) fn record(
    context: &Context,
    problem: &AttentionProblem,
    encoder: &mut wgpu::CommandEncoder,
    bindings: &Bindings<'_>,
) -> Result<()> {
    let device = context.device();
    let limits = context.limits();
    let plan = plan(context, problem)?;
    let tiles = plan.tiles;
    let flash = context.pipeline(
        PipelineKey {
            shader: "flash.wgsl",
            dtype: problem.dtype,
            constants: vec![
                ("WG_KV", tiles.key_lanes),
                ("WG_Q", tiles.row_lanes),
                ("KEYS", tiles.keys_per_lane),
                ("D_COLS", tiles.d_cols),
            ],
        },
        |device, key| compile(device, FLASH_WGSL, key),
    )?;

    let s = &problem.shape;
    let partial_elements = if plan.kv_splits > 1 {
        plan.kv_splits as usize * s.q_len()
    } else {
        1
    };
    let partial_buffer = |label: &str, elements: usize| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: 4 * elements as u64,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    };
    let partial_out = partial_buffer("wgpu-attention partial out", partial_elements);
    let partial_stats = partial_buffer(
        "wgpu-attention partial stats",
        if plan.kv_splits > 1 {
            2 * plan.kv_splits as usize * s.lse_len()
        } else {
            1
        },
    );
    let base = KernelParams {
        keys_per_split: plan.keys_per_split,
        kv_splits: plan.kv_splits,
        ..KernelParams::new(problem)
    };

    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("wgpu-attention flash"),
        timestamp_writes: None,
    });
    let packed_rows = (s.group_size() * s.seq_q) as u32;
    let grid = [
        packed_rows.div_ceil(tiles.block_q()),
        plan.kv_splits,
        (s.batch * s.kv_heads) as u32,
    ];
    pass.set_pipeline(&flash.pipeline);
    for part in split_grid(grid, limits.max_compute_workgroups_per_dimension) {
        let params = KernelParams {
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
            &partial_out,
            &partial_stats,
        ];
        let bind_group = bind_buffers(device, &flash, "wgpu-attention flash", &buffers);
        pass.set_bind_group(0, &bind_group, &[]);
        log::trace!("flash dispatch {part:?} with {plan:?}");
        pass.dispatch_workgroups(part.count[0], part.count[1], part.count[2]);
    }
    if plan.kv_splits == 1 {
        return Ok(());
    }

    let combine = context.pipeline(
        PipelineKey {
            shader: "combine.wgsl",
            dtype: problem.dtype,
            constants: vec![("WG", 64)],
        },
        |device, key| compile(device, COMBINE_WGSL, key),
    )?;
    pass.set_pipeline(&combine.pipeline);
    let grid = [s.seq_q as u32, 1, (s.batch * s.heads) as u32];
    for part in split_grid(grid, limits.max_compute_workgroups_per_dimension) {
        let params = KernelParams {
            group_offset: part.offset,
            ..base
        };
        let params_buffer = uniform(device, "wgpu-attention params", &params);
        let buffers = [
            &params_buffer,
            &partial_out,
            &partial_stats,
            bindings.out,
            bindings.lse,
        ];
        let bind_group = bind_buffers(device, &combine, "wgpu-attention combine", &buffers);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(part.count[0], part.count[1], part.count[2]);
    }
    Ok(())
}
