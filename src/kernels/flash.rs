//! The fused kernels: scores, online softmax and output in one pass per split of the key range,
//! plus a pass that merges the splits when there is more than one.
//!
//! Four programs compute the same thing. `flash.wgsl` tiles each block over key lanes and row
//! lanes and shares staged values through workgroup memory, the usual layout for GPUs.
//! `flash_rows.wgsl` gives each invocation one query row in private registers, so a CPU driver
//! that runs invocations as SIMD lanes computes across rows with no exchange between lanes. On
//! lavapipe it ran about twice as fast as the tiled program. `flash_decode.wgsl` gives each
//! block of up to 4 query rows of one key/value head a workgroup whose invocations each take a
//! run of consecutive keys, each key read once for the whole block. `flash_subgroup.wgsl` makes a workgroup
//! of one subgroup of 8 invocations, each with up to 4 query rows. At each step every invocation
//! reads one key, and subgroup broadcasts pass it to the other seven.
//!
//! On lavapipe, every read from memory costs a loop over the SIMD lanes. The CPU programs
//! therefore differ mainly in how many rows each read serves: 1 in the row program, up to 4 in
//! the decoding program and up to 32 in the subgroup program. CPU adapters use the decoding program
//! where a key/value head has at most 4 rows, as in decoding, and the subgroup program above,
//! where the adapter has subgroups of 8.
//!
//! Memory grows with the inputs and with `kv_splits × seq_q × head_dim` for the partial results,
//! never with `seq_q × seq_kv`.

use crate::attention::Kernel;
use crate::context::{Context, LLVMPIPE_MAX_LOOP_ITERATIONS, PipelineKey, Scratch};
use crate::error::{Error, Result};
use crate::kernels::three_stage::Bindings;
use crate::kernels::tiling::{
    FLASH_DECODE_ROWS, FLASH_ROWS, FLASH_ROWS_MIN_TILE_KV, FLASH_SUBGROUP_SIZE, FlashDecodeTiles,
    FlashRowTiles, FlashSubgroupTiles, FlashTiles, RowLoads,
};
use crate::kernels::{
    Command, EXTRA_ALIBI, KernelParams, SPLIT_PARTIALS_FIX, SPLIT_ROWS_FIX, check_binding, compile,
    grid_dispatches,
};
use crate::problem::AttentionProblem;

const FLASH_WGSL: &str = concat!(
    include_str!("../../shaders/fused_bindings.wgsl"),
    include_str!("../../shaders/flash.wgsl")
);
const FLASH_ROWS_WGSL: &str = concat!(
    include_str!("../../shaders/fused_bindings.wgsl"),
    include_str!("../../shaders/load_rows.wgsl"),
    include_str!("../../shaders/flash_rows.wgsl")
);
const FLASH_ROWS_VEC4_WGSL: &str = concat!(
    include_str!("../../shaders/fused_bindings.wgsl"),
    include_str!("../../shaders/load_q_vec4.wgsl"),
    include_str!("../../shaders/load_rows_vec4.wgsl"),
    include_str!("../../shaders/flash_rows.wgsl")
);

/// A program that reads K and V rows through `read_k` and `read_v`, after the fused programs'
/// bindings and each of the four files that define those reads, in the order of [`RowLoads`].
/// All but the scalar one read Q through `load_q_vec4.wgsl`.
macro_rules! with_row_loads {
    ($program:literal) => {
        [
            concat!(
                include_str!("../../shaders/fused_bindings.wgsl"),
                include_str!("../../shaders/load_rows.wgsl"),
                include_str!($program)
            ),
            concat!(
                include_str!("../../shaders/fused_bindings.wgsl"),
                include_str!("../../shaders/load_q_vec4.wgsl"),
                include_str!("../../shaders/load_rows_vec4.wgsl"),
                include_str!($program)
            ),
            concat!(
                include_str!("../../shaders/fused_bindings.wgsl"),
                include_str!("../../shaders/load_q_vec4.wgsl"),
                include_str!("../../shaders/load_rows_u64.wgsl"),
                include_str!($program)
            ),
            concat!(
                include_str!("../../shaders/fused_bindings.wgsl"),
                include_str!("../../shaders/load_q_vec4.wgsl"),
                include_str!("../../shaders/load_rows_u64_f16.wgsl"),
                include_str!($program)
            ),
        ]
    };
}

const FLASH_DECODE_WGSL: [&str; 4] = with_row_loads!("../../shaders/flash_decode.wgsl");
const FLASH_SUBGROUP_WGSL: [&str; 4] = with_row_loads!("../../shaders/flash_subgroup.wgsl");

/// Returns the constants that the decoding and subgroup programs share: the vec4 columns of the
/// head dims, and 1 or 0 for soft-capping, ALiBi and the mask, which are compile-time constants
/// there because llvmpipe runs both sides of every branch.
fn row_constants(
    d4: u32,
    d4v: u32,
    problem: &AttentionProblem,
    extras: u32,
) -> [(&'static str, u32); 5] {
    [
        ("D4", d4),
        ("D4V", d4v),
        ("SOFTCAP", u32::from(problem.softcap.is_some())),
        ("ALIBI", u32::from(extras & EXTRA_ALIBI != 0)),
        ("MASK", u32::from(problem.mask.is_some())),
    ]
}

/// Returns the source of a program built by [`with_row_loads`] for `loads`.
fn with_loads(sources: &[&'static str; 4], loads: RowLoads) -> &'static str {
    match loads {
        RowLoads::Scalar => sources[0],
        RowLoads::Vec4 => sources[1],
        RowLoads::Wide => sources[2],
        RowLoads::WideF16 => sources[3],
    }
}
const COMBINE_WGSL: &str = include_str!("../../shaders/combine.wgsl");

/// Workgroups below which the key range is split for parallelism on GPUs, when each split keeps
/// at least [`MIN_KEYS_PER_SPLIT`] keys. Decoding one query over 32 heads gives 8 to 32
/// workgroups, too few to fill a GPU.
const TARGET_WORKGROUPS: u64 = 128;
/// Minimum keys per split when splitting for parallelism, so the merge pass stays small.
const MIN_KEYS_PER_SPLIT: u64 = 512;

/// Returns the workgroups below which the key range is split for parallelism:
/// [`TARGET_WORKGROUPS`] on GPUs, and two per host thread (at least 4) on CPU adapters. Their
/// drivers run workgroups on the host's cores (llvmpipe on one thread per CPU, unless
/// `LP_NUM_THREADS` sets another count), so more splits only add near-empty workgroups and the
/// merge pass. On lavapipe with 2 cores, 4 in place of 128 took decoding B1 H32 H_kv32 over
/// 4,096 keys at D128 from 11.9 to 11.1 ms, and B1 H32 H_kv8 over 16,384 keys from 19.6 to
/// 17.0 ms (`bench`, alternating runs).
fn target_workgroups(on_cpu: bool) -> u64 {
    if !on_cpu {
        return TARGET_WORKGROUPS;
    }
    // On Linux std opens three cgroup files to answer, 12.7 µs per call on the 2-core VM of
    // BENCHMARKS.md (about half of a `record` call), so the count is taken once per process.
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads = *THREADS
        .get_or_init(|| std::thread::available_parallelism().map_or(1, |threads| threads.get()));
    (2 * threads as u64).clamp(4, TARGET_WORKGROUPS)
}

/// Most value columns per invocation (`D_COLS_V`) at which the tiled program's loops over them
/// are counted as unrolled for llvmpipe's loop cap. NIR (Mesa 22.3) unrolled them at 20 and
/// left them rolled at 24.
const FLASH_UNROLLED_VALUE_COLUMNS: u32 = 20;

/// The fused program that runs, with its sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlashVariant {
    /// `flash.wgsl`: key lanes × row lanes with a shared Q block.
    Tiled(FlashTiles),
    /// `flash_rows.wgsl`: one query row per invocation.
    Rows(FlashRowTiles),
    /// `flash_decode.wgsl`: invocations take runs of consecutive keys for a few rows.
    Decode(FlashDecodeTiles),
    /// `flash_subgroup.wgsl`: rows per invocation, keys shared by subgroup broadcasts.
    Subgroup(FlashSubgroupTiles),
}

impl FlashVariant {
    /// Packed query rows per workgroup.
    fn block_q(&self) -> u32 {
        match self {
            FlashVariant::Tiled(tiles) => tiles.block_q(),
            FlashVariant::Rows(tiles) => tiles.workgroup,
            FlashVariant::Decode(tiles) => tiles.rows,
            FlashVariant::Subgroup(tiles) => tiles.block_q(),
        }
    }

    /// Keys per staged tile.
    fn tile_kv(&self) -> u32 {
        match self {
            FlashVariant::Tiled(tiles) => tiles.tile_kv(),
            FlashVariant::Rows(tiles) => tiles.tile_kv,
            FlashVariant::Decode(tiles) => tiles.workgroup,
            FlashVariant::Subgroup(_) => FLASH_SUBGROUP_SIZE,
        }
    }

    /// Returns an upper estimate of the loop iterations one invocation runs per key tile, for
    /// llvmpipe's loop cap.
    ///
    /// llvmpipe counts every pass through a loop, the final one that ends it included, so a
    /// rolled loop of n iterations counts n + 1 each time it is entered.
    ///
    /// Loops over the rows and keys of an invocation (at most 4 iterations) are unrolled and not
    /// counted; the others are. Tiled: the tile loop, the K and V staging loops, the dot
    /// products over the padded head dim, and per row the loops over the lanes' maxima and over
    /// the tile's keys. Then come the loops over an invocation's value columns (D_COLS_V): in
    /// the P V product for every key of the tile, and in the rescale for every row. NIR
    /// unrolled those at 12 to 20 columns and left them rolled from 24 (head dims 384 and up),
    /// so they count from 21 columns, and the sum is then taken 10 % larger. Before they were
    /// counted, invocations at those head dims passed the cap and stopped early. Counting them
    /// at every head dim would give shapes such as B1 H8 S4096 D256 more splits than the
    /// partial outputs' binding holds.
    ///
    /// Iterations per tile measured on lavapipe (Mesa 22.3) with 8 heads of 16 rows, as 65,535
    /// over the largest number of tiles that still gave right results, and this estimate:
    /// - head dim 192: 630 to 636, estimate 771;
    /// - 256: 555 to 560, estimate 643;
    /// - 320: 682 to 689, estimate 771;
    /// - 384: 1,598 to 1,638, estimate 1,940;
    /// - 448: 4,095 to 4,369, estimate 4,936;
    /// - 512: 4,681 to 5,041, estimate 5,598;
    /// - 576 (value head dim 512): 5,041 to 5,461, estimate 5,812.
    ///
    /// Rows: the tile loop, the staging loop, and the score and P V loops over the tile's keys,
    /// plus 8 (measured: 148 at head dim 64, where this gives 153).
    ///
    /// Decoding and subgroup programs: one step of the key loop, whose inner loops NIR unrolls,
    /// and 2 leaves a margin. The count is right because llvmpipe is a CPU adapter, where these
    /// programs go without wgpu's bounds checks (see [`Self::bounds_checks`]). With the checks,
    /// NIR left their loops over vec4 columns and the softmax's loop over the rows rolled. On
    /// lavapipe (Mesa 22.3), the decoding program then returned wrong rows past 67 steps of 4
    /// rows at head dim 128, and the subgroup program past 136 steps of 2 rows.
    fn tile_iterations(&self) -> u64 {
        let with_margin = |count: u64| count + count.div_ceil(10);
        match self {
            FlashVariant::Tiled(tiles) => {
                let invocations = u64::from(tiles.key_lanes * tiles.row_lanes);
                let k_chunks = u64::from(tiles.d_pad() / tiles.k_chunk);
                let v_chunks = u64::from(tiles.tile_kv() / tiles.v_keys);
                let staging = k_chunks
                    * u64::from(tiles.tile_kv() * tiles.k_chunk).div_ceil(invocations)
                    + v_chunks * u64::from(tiles.v_keys * tiles.dv_pad()).div_ceil(invocations);
                let rows = u64::from(FLASH_ROWS);
                let counted = 1
                    + staging
                    + k_chunks
                    + v_chunks
                    + u64::from(tiles.d_pad())
                    + rows * u64::from(tiles.key_lanes + tiles.tile_kv());
                if tiles.d_cols_v <= FLASH_UNROLLED_VALUE_COLUMNS {
                    counted
                } else {
                    let columns = (u64::from(tiles.tile_kv()) + rows) * u64::from(tiles.d_cols_v);
                    with_margin(counted + columns)
                }
            }
            FlashVariant::Rows(tiles) => {
                let workgroup = u64::from(tiles.workgroup);
                let staging = u64::from(tiles.tile_kv * tiles.d4).div_ceil(workgroup)
                    + u64::from(tiles.tile_kv * tiles.d4v).div_ceil(workgroup);
                1 + staging + 2 * u64::from(tiles.tile_kv) + 8
            }
            FlashVariant::Decode(_) | FlashVariant::Subgroup(_) => 2,
        }
    }

    /// Returns an upper estimate of the loop iterations outside the key loop. That is loading
    /// the Q block, and in the decoding and subgroup programs also the merge and the output
    /// stores, which follow the key loop and share its count. For those two programs every such
    /// loop is counted as rolled, at n + 1 passes: four loops over the rows, the pass that ends
    /// the key loop, and per row the loops below.
    fn setup_iterations(&self) -> u64 {
        match self {
            FlashVariant::Tiled(tiles) => {
                let invocations = u64::from(tiles.key_lanes * tiles.row_lanes);
                u64::from(tiles.block_q() * tiles.d_pad()).div_ceil(invocations)
            }
            FlashVariant::Rows(_) => 0,
            // Per row: loading Q, the initial state, publishing the state, and the merge. The
            // merge has two loops over the invocations and a column loop, which contains one more
            // loop over the invocations and one over a vec4.
            FlashVariant::Decode(tiles) => {
                let (rows, d4, d4v, wg) = (tiles.rows, tiles.d4, tiles.d4v, tiles.workgroup);
                let merge_columns = d4v.div_ceil(wg);
                let per_row = (d4 + 1)
                    + (d4v + 1)
                    + 2 * (wg + 1)
                    + (merge_columns + 1)
                    + merge_columns * ((wg + 1) + 5);
                u64::from(4 * (rows + 1) + 1) + u64::from(rows) * u64::from(per_row)
            }
            // Per row: loading Q, and the output stores, staged or not, whose loops over the
            // columns each contain a loop over a vec4.
            FlashVariant::Subgroup(tiles) => {
                let (rows, d4, d4v) = (tiles.rows, tiles.d4, tiles.d4v);
                let per_row = (d4 + 1) + 2 * (d4v + 1) + d4v * 5;
                u64::from(4 * (rows + 1) + 1) + u64::from(rows) * u64::from(per_row)
            }
        }
    }

    /// Returns whether the program is built with wgpu's bounds checks. The decoding and
    /// subgroup programs run without them on CPU adapters (see `compile`).
    fn bounds_checks(&self, on_cpu: bool) -> bool {
        match self {
            FlashVariant::Tiled(_) | FlashVariant::Rows(_) => true,
            FlashVariant::Decode(_) | FlashVariant::Subgroup(_) => !on_cpu,
        }
    }

    /// Returns the pipeline key of this program for `problem` and the call's `EXTRA_*` bits, on
    /// a CPU adapter or not.
    fn pipeline_key(&self, problem: &AttentionProblem, extras: u32, on_cpu: bool) -> PipelineKey {
        match self {
            FlashVariant::Tiled(tiles) => PipelineKey {
                shader: "flash.wgsl",
                dtype: problem.dtype,
                constants: vec![
                    ("WG_KV", tiles.key_lanes),
                    ("WG_Q", tiles.row_lanes),
                    ("KEYS", tiles.keys_per_lane),
                    ("D_COLS", tiles.d_cols),
                    ("D_COLS_V", tiles.d_cols_v),
                    ("K_CHUNK", tiles.k_chunk),
                    ("V_KEYS", tiles.v_keys),
                    ("KV_TILE", tiles.kv_tile()),
                ],
                bounds_checks: self.bounds_checks(on_cpu),
            },
            FlashVariant::Rows(tiles) => PipelineKey {
                shader: if tiles.vec4_loads {
                    "flash_rows.wgsl with vec4 loads"
                } else {
                    "flash_rows.wgsl"
                },
                dtype: problem.dtype,
                constants: vec![
                    ("WG", tiles.workgroup),
                    ("TILE_KV", tiles.tile_kv),
                    ("D4", tiles.d4),
                    ("D4V", tiles.d4v),
                ],
                bounds_checks: self.bounds_checks(on_cpu),
            },
            FlashVariant::Decode(tiles) => {
                let mut constants = vec![("WG", tiles.workgroup), ("ROWS", tiles.rows)];
                constants.extend(row_constants(tiles.d4, tiles.d4v, problem, extras));
                PipelineKey {
                    shader: match tiles.loads {
                        RowLoads::Scalar => "flash_decode.wgsl",
                        RowLoads::Vec4 => "flash_decode.wgsl with vec4 loads",
                        RowLoads::Wide | RowLoads::WideF16 => "flash_decode.wgsl with u64 loads",
                    },
                    dtype: problem.dtype,
                    constants,
                    bounds_checks: self.bounds_checks(on_cpu),
                }
            }
            FlashVariant::Subgroup(tiles) => {
                let mut constants = vec![
                    ("SG", FLASH_SUBGROUP_SIZE),
                    ("ROWS", tiles.rows),
                    ("STAGED_STORES", u32::from(tiles.staged_stores())),
                ];
                constants.extend(row_constants(tiles.d4, tiles.d4v, problem, extras));
                PipelineKey {
                    shader: match tiles.loads {
                        RowLoads::Scalar => "flash_subgroup.wgsl",
                        RowLoads::Vec4 => "flash_subgroup.wgsl with vec4 loads",
                        RowLoads::Wide | RowLoads::WideF16 => "flash_subgroup.wgsl with u64 loads",
                    },
                    dtype: problem.dtype,
                    constants,
                    bounds_checks: self.bounds_checks(on_cpu),
                }
            }
        }
    }

    fn program(&self) -> &'static str {
        match self {
            FlashVariant::Tiled(_) => FLASH_WGSL,
            FlashVariant::Rows(tiles) if tiles.vec4_loads => FLASH_ROWS_VEC4_WGSL,
            FlashVariant::Rows(_) => FLASH_ROWS_WGSL,
            FlashVariant::Decode(tiles) => with_loads(&FLASH_DECODE_WGSL, tiles.loads),
            FlashVariant::Subgroup(tiles) => with_loads(&FLASH_SUBGROUP_WGSL, tiles.loads),
        }
    }
}

/// The layout of one fused call: the program and the split of the key range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlashPlan {
    pub variant: FlashVariant,
    /// Keys per split, a multiple of the tile's keys.
    pub keys_per_split: u32,
    /// Splits of the key range; 1 means no merge pass.
    pub kv_splits: u32,
}

/// Plans `kernel` (one of the fused kernels) for `problem`, or returns the error that explains
/// why it cannot run.
///
/// [`Kernel::Flash`] takes the tiled program on GPUs. On CPU adapters, at head dims up to 128,
/// it takes the decoding program where a key/value head has at most [`FLASH_DECODE_ROWS`]
/// packed rows, and the subgroup program above where the device has subgroups of exactly 8.
/// Each falls back to the other, then to the row and tiled programs. The next program also
/// takes over where one would need more key splits than fit the partial outputs' binding, as a
/// long sequence can where many short ones bring the partial outputs' size up.
///
/// On lavapipe the decoding program ran 12.4× faster than the row program for one query row
/// (B1 H32 Skv4096 D128). At 4 rows per key/value head it ran about as fast as the subgroup
/// program, which then leaves half its lanes idle (7.0 against 7.2 ms, B1 H32 H_kv8 Skv4096
/// D128). At 1 row it was faster (21.3 against 25.3 ms at H_kv32). Above 4 rows, with both
/// programs reading 8 floats at a time, the subgroup program ran 1.7× to 2.3× faster than the
/// decoding program from 512 × 512 to 4,096 × 4,096 (B1 H8 D64). At the MiniLM batch it ran
/// 2.7× faster.
// NOTE: measured on lavapipe only (Mesa 22.3.6, 2 cores); other CPU drivers may differ.
pub(crate) fn plan(
    context: &Context,
    kernel: Kernel,
    problem: &AttentionProblem,
) -> Result<FlashPlan> {
    crate::kernels::check_storage_buffers(
        context,
        kernel.name(),
        crate::kernels::FLASH_STORAGE_BUFFERS,
    )?;
    let limits = context.limits();
    let s = &problem.shape;
    let on_cpu = context.on_cpu();
    let rows = || FlashRowTiles::choose(problem, limits).map(FlashVariant::Rows);
    let tiled = || FlashTiles::choose(problem, limits).map(FlashVariant::Tiled);
    let loads = RowLoads::choose(problem, context.features());
    let decode = || FlashDecodeTiles::choose(problem, limits, loads).map(FlashVariant::Decode);
    let subgroup_fits = context.fixed_subgroup_size() == Some(FLASH_SUBGROUP_SIZE);
    let subgroup = || {
        FlashSubgroupTiles::choose(problem, limits, loads)
            .filter(|_| subgroup_fits)
            .map(FlashVariant::Subgroup)
    };
    let few_rows = s.group_size() * s.seq_q <= FLASH_DECODE_ROWS as usize;
    // The programs to try, in order of preference. A program that needs more key splits than
    // fit the partial outputs' binding gives way to the next.
    let candidates = match kernel {
        Kernel::FlashRows => vec![rows()],
        Kernel::FlashTiled => vec![tiled()],
        Kernel::FlashDecode => vec![decode()],
        Kernel::FlashSubgroup => vec![subgroup()],
        _ if on_cpu && few_rows => vec![decode(), subgroup(), rows(), tiled()],
        _ if on_cpu => vec![subgroup(), decode(), rows(), tiled()],
        _ => vec![tiled()],
    };
    let mut first_error = None;
    for variant in candidates.into_iter().flatten() {
        match split_keys(context, kernel, problem, variant) {
            Ok(plan) => return Ok(plan),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| unsupported(context, kernel, problem)))
}

/// Splits the key range of `problem` for `variant`, a program of `kernel`: enough splits to keep
/// each invocation under llvmpipe's loop cap and, on small grids, to give every thread of the
/// device work. Returns the error of a split whose partial outputs exceed the binding limit.
fn split_keys(
    context: &Context,
    kernel: Kernel,
    problem: &AttentionProblem,
    variant: FlashVariant,
) -> Result<FlashPlan> {
    let s = &problem.shape;
    let on_cpu = context.on_cpu();
    let tile_kv = u64::from(variant.tile_kv());
    let seq_kv = s.seq_kv as u64;
    let mut splits = 1;
    if context.loop_iterations_capped() {
        let budget = LLVMPIPE_MAX_LOOP_ITERATIONS - variant.setup_iterations();
        let per_tile = variant.tile_iterations();
        let max_keys = (budget / per_tile) * tile_kv;
        splits = seq_kv.div_ceil(max_keys.max(tile_kv));
    }
    let workgroups = ((s.group_size() * s.seq_q) as u64).div_ceil(u64::from(variant.block_q()))
        * (s.batch * s.kv_heads) as u64;
    let target = target_workgroups(on_cpu);
    if workgroups < target {
        let for_parallelism = target.div_ceil(workgroups).min(seq_kv / MIN_KEYS_PER_SPLIT);
        splits = splits.max(for_parallelism);
    }
    let keys_per_split = seq_kv.div_ceil(splits.max(1)).div_ceil(tile_kv) * tile_kv;
    let kv_splits = seq_kv.div_ceil(keys_per_split);
    if kv_splits > 1 {
        check_binding(
            context.limits(),
            "the partial outputs of the key splits",
            kv_splits as usize * (s.out_len() + 2 * s.lse_len()),
            4,
            if matches!(kernel, Kernel::Flash | Kernel::Auto) {
                SPLIT_ROWS_FIX
            } else {
                SPLIT_PARTIALS_FIX
            },
        )?;
    }
    Ok(FlashPlan {
        variant,
        keys_per_split: keys_per_split as u32,
        kv_splits: kv_splits as u32,
    })
}

/// Builds the error for a fused kernel that cannot run `problem` on `context`'s device.
fn unsupported(context: &Context, kernel: Kernel, problem: &AttentionProblem) -> Error {
    let limits = context.limits();
    let s = &problem.shape;
    let head_dim = s.head_dim.max(s.head_dim_v);
    let row_kernel = matches!(
        kernel,
        Kernel::FlashRows | Kernel::FlashDecode | Kernel::FlashSubgroup
    );
    if row_kernel && head_dim > crate::kernels::tiling::FLASH_ROWS_MAX_HEAD_DIM {
        let name = if s.head_dim >= s.head_dim_v {
            "head_dim"
        } else {
            "head_dim_v"
        };
        return Error::Unsupported {
            kernel: kernel.name(),
            what: format!("{name} {head_dim}, over its maximum of 128"),
            fix: "use Kernel::Flash or Kernel::FlashTiled (flash or flash-tiled in the CLI)",
        };
    }
    let subgroup_fits = context.fixed_subgroup_size() == Some(FLASH_SUBGROUP_SIZE);
    if kernel == Kernel::FlashSubgroup && !subgroup_fits {
        let info = context.adapter_info();
        if context.features().contains(wgpu::Features::SUBGROUP) {
            return Error::Unsupported {
                kernel: kernel.name(),
                what: format!(
                    "subgroups of {} to {} invocations, where the program needs exactly \
                     {FLASH_SUBGROUP_SIZE}",
                    info.subgroup_min_size, info.subgroup_max_size
                ),
                fix: "use Kernel::Flash (flash in the CLI), which picks a program the device runs",
            };
        }
        if context.adapter_lacks(wgpu::Features::SUBGROUP) {
            return Error::Unsupported {
                kernel: kernel.name(),
                what: format!(
                    "adapter {} ({}), which offers no SUBGROUP feature",
                    info.name,
                    crate::backend_name(info.backend)
                ),
                fix: "use Kernel::Flash (flash in the CLI), which picks a program the device runs, \
                      or an adapter with subgroups, such as lavapipe on Vulkan",
            };
        }
        return Error::Unsupported {
            kernel: kernel.name(),
            what: "a device without the SUBGROUP feature".to_string(),
            fix: "create the device with wgpu::Features::SUBGROUP where the adapter offers it, \
                  or use Kernel::Flash (flash in the CLI), which picks a program the device runs",
        };
    }

    // Otherwise the program's smallest block does not fit the device's workgroup memory.
    let row_fix = "use Kernel::Flash (flash in the CLI), which picks a program that fits the \
                   device, or Kernel::ThreeStage (three-stage in the CLI)";
    let (block, needed, fix) = match kernel {
        Kernel::FlashRows => (
            format!("a tile of {FLASH_ROWS_MIN_TILE_KV} K and V rows"),
            FLASH_ROWS_MIN_TILE_KV * FlashRowTiles::key_bytes(problem),
            row_fix,
        ),
        Kernel::FlashDecode => (
            "the merge state of one row".to_string(),
            FlashDecodeTiles::row_bytes(problem, limits),
            row_fix,
        ),
        Kernel::FlashSubgroup => (
            "the outputs of one row per invocation".to_string(),
            FlashSubgroupTiles::row_bytes(problem),
            row_fix,
        ),
        _ => {
            let smallest = FlashTiles {
                key_lanes: 16,
                row_lanes: 1,
                keys_per_lane: 1,
                d_cols: (s.head_dim as u32).div_ceil(16),
                d_cols_v: (s.head_dim_v as u32).div_ceil(16),
                k_chunk: 16,
                v_keys: 1,
            };
            (
                "the smallest block of the tiled program".to_string(),
                smallest.workgroup_bytes(),
                "use Kernel::ThreeStage (three-stage in the CLI) on this device",
            )
        }
    };
    Error::ExceedsLimit {
        what: format!(
            "{} at head dims {}/{} ({block})",
            kernel.name(),
            s.head_dim,
            s.head_dim_v
        ),
        value: u64::from(needed),
        limit_name: "max_compute_workgroup_storage_size",
        limit: u64::from(limits.max_compute_workgroup_storage_size),
        fix,
    }
}

/// Builds the pass of the fused kernel's dispatches, followed by the merge pass's when the key
/// range is split.
pub(crate) fn commands(
    context: &Context,
    kernel: Kernel,
    problem: &AttentionProblem,
    bindings: &Bindings<'_>,
) -> Result<Vec<Command>> {
    let plan = plan(context, kernel, problem)?;
    let on_cpu = context.on_cpu();
    let program = plan.variant.program();
    let flash = context.pipeline(
        plan.variant.pipeline_key(problem, bindings.extras, on_cpu),
        |device, key| compile(device, program, key),
    )?;

    let s = &problem.shape;
    let split = plan.kv_splits > 1;
    let splits = plan.kv_splits as usize;
    // The splits' outputs, then their (m, l) pairs.
    let partial_len = if split {
        splits * (s.out_len() + 2 * s.lse_len())
    } else {
        1
    };
    let partial = context.scratch(Scratch::Partial, 4 * partial_len as u64);
    let base = KernelParams {
        keys_per_split: plan.keys_per_split,
        kv_splits: plan.kv_splits,
        min_keys_per_split: MIN_KEYS_PER_SPLIT as u32,
        split_align: plan.variant.tile_kv(),
        ..KernelParams::new(problem, bindings.extras)
    };

    let packed_rows = (s.group_size() * s.seq_q) as u32;
    let grid = [
        packed_rows.div_ceil(plan.variant.block_q()),
        plan.kv_splits,
        (s.batch * s.kv_heads) as u32,
    ];
    log::trace!("flash plan {plan:?}");
    let mut dispatches = grid_dispatches(
        context,
        &flash,
        "wgpu-attention flash",
        grid,
        &base,
        &[
            bindings.q,
            bindings.k,
            bindings.v,
            bindings.mask,
            bindings.out,
            bindings.lse,
            &partial,
            bindings.aux,
        ],
    );
    if split {
        let combine = context.pipeline(
            PipelineKey {
                shader: "combine.wgsl",
                dtype: problem.dtype,
                constants: vec![("WG", 64)],
                bounds_checks: true,
            },
            |device, key| compile(device, COMBINE_WGSL, key),
        )?;
        dispatches.extend(grid_dispatches(
            context,
            &combine,
            "wgpu-attention combine",
            [s.seq_q as u32, 1, (s.batch * s.heads) as u32],
            &base,
            &[&partial, bindings.out, bindings.lse, bindings.aux],
        ));
    }
    Ok(vec![Command::Pass {
        label: "wgpu-attention flash",
        dispatches,
    }])
}
