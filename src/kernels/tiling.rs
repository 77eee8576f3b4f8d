//! Tile and workgroup sizes, chosen in one place from the problem and the device limits.
//!
//! Each field's doc names the shader constant it sets. Shaders declare most of them as `override`
//! constants; `flash_decode.wgsl` and `flash_subgroup.wgsl` get them as `const` declarations
//! ahead of their sources. The host derives its dispatch grids from the same values.

use crate::problem::{AttentionProblem, Dtype};

/// Outputs per invocation along each axis of the matrix-product kernels, as `ROWS` and `COLS`
/// in `scores.wgsl` and `probs_v.wgsl`. These are `const` in WGSL because per-invocation arrays
/// must have a constant size.
pub(crate) const OUTPUTS_PER_INVOCATION: u32 = 4;

/// Sizes for the three-stage path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ThreeStageTiles {
    /// Invocations of the matrix-product kernels along each output axis (`WG_Q`, `WG_KV`, `WG_D`).
    pub workgroup_side: u32,
    /// Reduction columns staged through workgroup memory per step (`TILE_D` of the score
    /// kernel, `TILE_KV` of the output kernel).
    pub reduction_tile: u32,
    /// Invocations per row in the softmax kernel (`WG`), a power of two.
    pub softmax_workgroup: u32,
}

impl ThreeStageTiles {
    /// Output rows (or columns) each matrix-product workgroup covers.
    pub fn output_tile(&self) -> u32 {
        self.workgroup_side * OUTPUTS_PER_INVOCATION
    }

    /// Chooses the sizes.
    ///
    /// The matrix-product kernels use 16 × 16 invocations, each computing 4 × 4 outputs, so a
    /// workgroup covers a 64 × 64 output tile and reads each staged value 4 times from
    /// workgroup memory per multiply. Two 64 × 16 staging tiles take 8 KiB of the 16 KiB every
    /// WebGPU device has. Devices below 256 invocations per workgroup (GLES 3.1 guarantees 128)
    /// get 8 × 8. The softmax kernel uses one invocation per key up to 256, at least 32.
    pub fn choose(problem: &AttentionProblem, limits: &wgpu::Limits) -> Self {
        let max_invocations = limits.max_compute_invocations_per_workgroup;
        let max_side = limits
            .max_compute_workgroup_size_x
            .min(limits.max_compute_workgroup_size_y);
        let workgroup_side = if max_invocations >= 256 && max_side >= 16 {
            16
        } else {
            8
        };
        let staging_bytes = 2 * workgroup_side * OUTPUTS_PER_INVOCATION * 16 * 4;
        let reduction_tile = if staging_bytes <= limits.max_compute_workgroup_storage_size {
            16
        } else {
            8
        };

        let softmax_cap = max_invocations
            .min(limits.max_compute_workgroup_size_x)
            .min(256);
        let softmax_cap = floor_power_of_two(softmax_cap);
        let wanted = (problem.shape.seq_kv.min(256) as u32)
            .next_power_of_two()
            .max(32);
        let softmax_workgroup = wanted.min(softmax_cap);
        Self {
            workgroup_side,
            reduction_tile,
            softmax_workgroup,
        }
    }
}

/// Sizes for the fused kernel in `flash.wgsl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlashTiles {
    /// Key lanes (`WG_KV`): the stride of each invocation's keys and output columns.
    pub key_lanes: u32,
    /// Row lanes (`WG_Q`); each owns [`FLASH_ROWS`] query rows.
    pub row_lanes: u32,
    /// Keys per lane per tile (`KEYS`), at most `MAX_KEYS` = 4 of `flash.wgsl`.
    pub keys_per_lane: u32,
    /// Query/key head-dim columns per lane (`D_COLS`), `ceil(head_dim / key_lanes)`.
    pub d_cols: u32,
    /// Output columns per invocation (`D_COLS_V`), `ceil(head_dim_v / key_lanes)`.
    pub d_cols_v: u32,
    /// K columns staged per step (`K_CHUNK`), dividing [`FlashTiles::d_pad`].
    pub k_chunk: u32,
    /// V keys staged per step (`V_KEYS`), dividing [`FlashTiles::tile_kv`].
    pub v_keys: u32,
}

/// Query rows per invocation of the fused kernel (`ROWS` in `flash.wgsl`).
pub(crate) const FLASH_ROWS: u32 = 4;

/// (row lanes, keys per lane) in order of preference: more rows per block reuse each K/V tile
/// more, and more keys per tile spread the four barriers of a tile over more work. On lavapipe
/// at head dim 64, (4, 4) ran 1.6 to 2 times faster than (8, 2), (16, 1), (2, 4), (4, 2) and
/// (8, 1) at 1024 × 1024 and 512 × 512, so keys per lane come first where memory allows.
const FLASH_CANDIDATES: [(u32, u32); 15] = [
    (16, 4),
    (8, 4),
    (16, 2),
    (4, 4),
    (8, 2),
    (16, 1),
    (2, 4),
    (4, 2),
    (8, 1),
    (1, 4),
    (2, 2),
    (4, 1),
    (1, 2),
    (2, 1),
    (1, 1),
];

impl FlashTiles {
    /// Query rows per workgroup.
    pub fn block_q(&self) -> u32 {
        self.row_lanes * FLASH_ROWS
    }

    /// Keys per tile.
    pub fn tile_kv(&self) -> u32 {
        self.key_lanes * self.keys_per_lane
    }

    /// Query/key head dim padded to a multiple of the key lanes.
    pub fn d_pad(&self) -> u32 {
        self.key_lanes * self.d_cols
    }

    /// Value head dim padded to a multiple of the key lanes.
    pub fn dv_pad(&self) -> u32 {
        self.key_lanes * self.d_cols_v
    }

    /// Floats of the K/V staging buffer (`KV_TILE`): one K chunk or one V chunk.
    pub fn kv_tile(&self) -> u32 {
        (self.tile_kv() * self.k_chunk).max(self.v_keys * self.dv_pad())
    }

    /// Returns the workgroup memory the kernel declares, in bytes: the Q block, the K/V staging
    /// buffer, the probability tile and the per-lane row maxima.
    pub fn workgroup_bytes(&self) -> u32 {
        4 * (self.fixed_floats() + self.kv_tile())
    }

    /// Floats of workgroup memory besides the K/V staging buffer.
    fn fixed_floats(&self) -> u32 {
        let block_q = self.block_q();
        block_q * self.d_pad() + block_q * self.tile_kv() + block_q * self.key_lanes
    }

    /// Sizes the K and V chunks as large as `bytes` of workgroup memory allows, preferring
    /// whole tiles. Returns `None` when not even 16 columns and one key fit.
    fn with_chunks(mut self, bytes: u32) -> Option<Self> {
        let floats = (bytes / 4).checked_sub(self.fixed_floats())?;
        let (d_cols, tile_kv) = (self.d_cols, self.tile_kv());
        let k_parts = (1..=d_cols).find(|&n| {
            d_cols.is_multiple_of(n) && self.tile_kv() * self.key_lanes * (d_cols / n) <= floats
        })?;
        self.k_chunk = self.key_lanes * (d_cols / k_parts);
        let v_parts = (1..=tile_kv)
            .find(|&n| tile_kv.is_multiple_of(n) && (tile_kv / n) * self.dv_pad() <= floats)?;
        self.v_keys = tile_kv / v_parts;
        Some(self)
    }

    /// Chooses the sizes, or returns `None` when even the smallest block does not fit the
    /// device's workgroup memory.
    ///
    /// The first of [`FLASH_CANDIDATES`] is taken whose workgroup memory and invocations fit the
    /// limits with whole K and V tiles staged at once. Its block must also be at most one
    /// halving taller than the packed query rows (query heads per key/value head times
    /// `seq_q`), because for decoding a tall block only adds idle rows. At head dim 64 and
    /// 32 KiB of workgroup memory that is 4 row lanes and 4 keys per lane (16 rows, 64-key
    /// tiles, 25 KiB). When no candidate fits whole tiles, as at head dim 576, the first that
    /// fits with K and V staged in chunks is taken.
    pub fn choose(problem: &AttentionProblem, limits: &wgpu::Limits) -> Option<Self> {
        let key_lanes = 16;
        let s = &problem.shape;
        let d_cols = (s.head_dim as u32).div_ceil(key_lanes);
        let d_cols_v = (s.head_dim_v as u32).div_ceil(key_lanes);
        let packed_rows = (s.group_size() * s.seq_q) as u64;
        let memory = limits.max_compute_workgroup_storage_size;
        let candidates = FLASH_CANDIDATES.into_iter().filter(|&(row_lanes, _)| {
            let fits_invocations = key_lanes * row_lanes
                <= limits.max_compute_invocations_per_workgroup
                && row_lanes <= limits.max_compute_workgroup_size_y
                && key_lanes <= limits.max_compute_workgroup_size_x;
            let not_too_tall =
                row_lanes == 1 || u64::from((row_lanes / 2) * FLASH_ROWS) < packed_rows;
            fits_invocations && not_too_tall
        });
        let whole = |(row_lanes, keys_per_lane)| Self {
            key_lanes,
            row_lanes,
            keys_per_lane,
            d_cols,
            d_cols_v,
            k_chunk: key_lanes * d_cols,
            v_keys: key_lanes * keys_per_lane,
        };
        candidates
            .clone()
            .map(whole)
            .find(|tiles| tiles.workgroup_bytes() <= memory)
            .or_else(|| candidates.map(whole).find_map(|t| t.with_chunks(memory)))
    }
}

/// Sizes for the row-per-invocation fused kernel in `flash_rows.wgsl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlashRowTiles {
    /// Rows per workgroup (`WG`), one per invocation.
    pub workgroup: u32,
    /// Keys staged per tile (`TILE_KV`).
    pub tile_kv: u32,
    /// vec4 columns of the query/key head dim (`D4`).
    pub d4: u32,
    /// vec4 columns of the value head dim (`D4V`).
    pub d4v: u32,
    /// Whether Q, K and V are read as whole vec4s ([`vec4_rows`]).
    pub vec4_loads: bool,
}

/// Returns whether the Q, K and V rows of `problem` can be read as whole vec4s: both head dims
/// and every stride of Q, K and V are multiples of 4 elements.
pub(crate) fn vec4_rows(problem: &AttentionProblem) -> bool {
    rows_in_groups_of(problem, 4) && q_rows_in_vec4s(problem)
}

/// Returns whether the Q rows of `problem` can be read as whole vec4s, as every row-load file
/// but the scalar one reads them: the head dim and every stride of Q are multiples of 4.
fn q_rows_in_vec4s(problem: &AttentionProblem) -> bool {
    let q = problem.strides().q;
    [problem.shape.head_dim, q.batch, q.head, q.seq]
        .iter()
        .all(|value| value.is_multiple_of(4))
}

/// Returns whether both head dims and every stride of K and V are multiples of `elements`.
fn rows_in_groups_of(problem: &AttentionProblem, elements: usize) -> bool {
    let s = &problem.shape;
    let strides = problem.strides();
    [
        s.head_dim,
        s.head_dim_v,
        strides.k.batch,
        strides.k.head,
        strides.k.seq,
        strides.v.batch,
        strides.v.head,
        strides.v.seq,
    ]
    .iter()
    .all(|value| value.is_multiple_of(elements))
}

/// The width of the reads with which the decoding and subgroup programs take K and V rows, which
/// selects the file that `kernels::flash` puts ahead of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowLoads {
    /// One element per read, for any head dim and strides (`load_rows.wgsl`).
    Scalar,
    /// A vec4 per read, where both head dims and every Q, K and V stride are multiples of 4
    /// (`load_rows_vec4.wgsl`).
    Vec4,
    /// Eight f32 values per read of K and V, as one `vec4<u64>`, where their head dims and
    /// strides are multiples of 8, the storage is f32 and the device has `SHADER_INT64`
    /// (`load_rows_u64.wgsl`). Q is read a vec4 at a time, as in `Vec4`. llvmpipe reads
    /// memory in a loop over the SIMD lanes, one pass per read, so twice the bytes per read
    /// halves the passes. On lavapipe it made decoding 1.7× faster (B1 H32 Skv4096 D128) and
    /// prefill 1.1× faster (B1 H8 S2048 D64).
    Wide,
    /// Sixteen f16 values per read, as one `vec4<u64>`, where those are multiples of 16, the
    /// storage is f16 and the device has `SHADER_INT64` (`load_rows_u64_f16.wgsl`).
    WideF16,
}

impl RowLoads {
    /// Returns the widest reads that `problem`'s rows allow on a device with `features`.
    pub fn choose(problem: &AttentionProblem, features: wgpu::Features) -> Self {
        let int64 = features.contains(wgpu::Features::SHADER_INT64);
        // One vec4<u64> read holds 8 f32 or 16 f16 elements.
        let (wide, elements) = match problem.dtype {
            Dtype::F32 => (RowLoads::Wide, 8),
            Dtype::F16 => (RowLoads::WideF16, 16),
        };
        if int64 && rows_in_groups_of(problem, elements) && q_rows_in_vec4s(problem) {
            wide
        } else if vec4_rows(problem) {
            RowLoads::Vec4
        } else {
            RowLoads::Scalar
        }
    }
}

/// Returns `rows`, halved (rounding up) until the workgroup memory that `bytes` gives for them
/// fits the device, or `None` where one row does not fit.
fn rows_that_fit(mut rows: u32, limits: &wgpu::Limits, bytes: impl Fn(u32) -> u32) -> Option<u32> {
    while bytes(rows) > limits.max_compute_workgroup_storage_size {
        if rows == 1 {
            return None;
        }
        rows = rows.div_ceil(2);
    }
    Some(rows)
}

/// Returns the largest power of two not above `value`, which must be at least 1.
fn floor_power_of_two(value: u32) -> u32 {
    1 << (31 - value.leading_zeros())
}

/// Sizes for the subgroup fused kernel in `flash_subgroup.wgsl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlashSubgroupTiles {
    /// Packed query rows per invocation (`ROWS`); the block holds
    /// [`FLASH_SUBGROUP_SIZE`] times as many.
    pub rows: u32,
    /// vec4 columns of the query/key head dim (`D4`).
    pub d4: u32,
    /// vec4 columns of the value head dim (`D4V`).
    pub d4v: u32,
    /// The width of the K and V reads.
    pub loads: RowLoads,
}

/// The subgroup size `flash_subgroup.wgsl` requires, which is also its workgroup size and the
/// keys of each step (`SG`). The program's broadcasts are written for 8 lanes, and it asserts
/// the value.
pub(crate) const FLASH_SUBGROUP_SIZE: u32 = 8;

/// Most query rows per invocation of `flash_subgroup.wgsl`.
pub(crate) const FLASH_SUBGROUP_MAX_ROWS: u32 = 4;

/// Most rows × vec4 value columns per invocation whose output stores `flash_subgroup.wgsl`
/// unrolls. Larger blocks keep their outputs in workgroup memory and store them in rolled
/// loops. On lavapipe that made the first call at B1 H8 S2048 D64 (4 rows × 16 columns) take
/// 5.2 to 5.3 s instead of 8.7 s. At B1 H8 S1024 D128 (2 × 32) it took 6.0 s instead of 9.3 to
/// 10.5 s. The MiniLM batch (1 × 8) stays unrolled: rolled, it ran in 5.02 to 5.38 ms against
/// 4.65 to 4.83 ms, for a first call 40 to 80 ms shorter.
pub(crate) const FLASH_SUBGROUP_UNROLLED_STORES: u32 = 16;

/// Bounds on the vec4 columns each invocation of `flash_subgroup.wgsl` keeps per row block,
/// `rows × (d4 + d4v)`: the query rows and output accumulators. Problems with at least
/// [`FLASH_SUBGROUP_LARGE_SCORES`] scores get the largest bound, and those under
/// [`FLASH_SUBGROUP_SMALL_SCORES`] the smallest.
///
/// Compile time grows faster than the columns. On lavapipe (Mesa 22.3.6), first calls at
/// 32, 48, 64, 96, 128 and 256 columns compiled for about 1.1, 1.7, 2.3 to 3.1, 4.9, 7.8 to 8.5
/// and 27 s. With vec4 reads of K and V, at B1 H8 S2048 D64, 4 rows per invocation (128
/// columns) ran in 205 ms against 232 ms for 3 and 276 ms for 2. At B1 H8 S1024 D128, 2 rows
/// (128 columns) ran in 157 ms. At the MiniLM batch, B4 H12 S128 D32, 2 rows (32 columns) ran
/// in 4.0 ms against 3.2 ms for 4, but compiled for 1.1 s against 2.3 s, which a first call
/// pays. (These times predate the rolled loops of the output stores, which brought 128 columns
/// at B1 H8 S2048 D64 from 8.5 to 5.1 s.)
pub(crate) const FLASH_SUBGROUP_COLUMNS: u32 = 128;
/// The bound for problems under [`FLASH_SUBGROUP_LARGE_SCORES`] scores.
pub(crate) const FLASH_SUBGROUP_SMALL_COLUMNS: u32 = 32;
/// The bound for problems under [`FLASH_SUBGROUP_SMALL_SCORES`] scores: one row per invocation
/// up to head dim 32.
pub(crate) const FLASH_SUBGROUP_TINY_COLUMNS: u32 = 16;

/// Scores under which a call runs for milliseconds and its first call is mostly compilation:
/// 1 Mi, as in 8 heads of 362 × 362. The MiniLM batch (B4 H12 S128 D32) has 0.75 Mi scores. On
/// lavapipe, on a slow, shared machine with Mesa's shader cache off, its first call took 0.91
/// to 1.00 s with 1 row per invocation, against 1.99 to 2.25 s with 2. It then ran in 8.2 to
/// 8.3 ms against 7.4 to 8.2 ms. So 2 rows would repay their compile time only after about
/// 2,000 calls in one process, and not at all once Mesa's shader cache contains the program.
pub(crate) const FLASH_SUBGROUP_SMALL_SCORES: u64 = 1 << 20;

/// Scores (`batch × heads × seq_q × seq_kv`) from which a problem runs long enough that the
/// larger row blocks of `flash_subgroup.wgsl` repay their compile time: 8 Mi, as in 8 heads of
/// 1,024 × 1,024. That shape ran in 53 ms at head dim 64 with 4 rows per invocation, and in
/// 71 ms with 2.
pub(crate) const FLASH_SUBGROUP_LARGE_SCORES: u64 = 1 << 23;

impl FlashSubgroupTiles {
    /// Packed query rows per workgroup.
    pub fn block_q(&self) -> u32 {
        FLASH_SUBGROUP_SIZE * self.rows
    }

    /// Returns whether the program stores its outputs through workgroup memory in rolled
    /// loops, as blocks over [`FLASH_SUBGROUP_UNROLLED_STORES`] do.
    pub fn staged_stores(&self) -> bool {
        self.rows * self.d4v > FLASH_SUBGROUP_UNROLLED_STORES
    }

    /// Chooses the sizes, or returns `None` when a head dim is over [`FLASH_ROWS_MAX_HEAD_DIM`]
    /// or one row per invocation does not fit the workgroup memory.
    ///
    /// Each invocation takes as many query rows as the column bound allows (see
    /// [`FLASH_SUBGROUP_COLUMNS`]), from 1 to [`FLASH_SUBGROUP_MAX_ROWS`]. It takes no more than
    /// one block needs to cover the packed rows of a key/value head (heads per key/value head ×
    /// `seq_q`), and fewer where the finished rows do not fit the workgroup memory. At
    /// B1 H8 S2048 D64 that is 4 rows per invocation, a block of 32, and at head dim 128 it is
    /// 2 rows.
    pub fn choose(
        problem: &AttentionProblem,
        limits: &wgpu::Limits,
        loads: RowLoads,
    ) -> Option<Self> {
        let s = &problem.shape;
        if s.head_dim.max(s.head_dim_v) > FLASH_ROWS_MAX_HEAD_DIM {
            return None;
        }
        let d4 = (s.head_dim as u32).div_ceil(4);
        let d4v = (s.head_dim_v as u32).div_ceil(4);
        let scores = (s.batch * s.heads * s.seq_q) as u64 * s.seq_kv as u64;
        let columns = if scores >= FLASH_SUBGROUP_LARGE_SCORES {
            FLASH_SUBGROUP_COLUMNS
        } else if scores >= FLASH_SUBGROUP_SMALL_SCORES {
            FLASH_SUBGROUP_SMALL_COLUMNS
        } else {
            FLASH_SUBGROUP_TINY_COLUMNS
        };
        let packed_rows = (s.group_size() * s.seq_q) as u32;
        let rows = (columns / (d4 + d4v))
            .min(packed_rows.div_ceil(FLASH_SUBGROUP_SIZE))
            .clamp(1, FLASH_SUBGROUP_MAX_ROWS);
        let row_bytes = Self::row_bytes(problem);
        let rows = rows_that_fit(rows, limits, |rows| rows * row_bytes)?;
        Some(Self {
            rows,
            d4,
            d4v,
            loads,
        })
    }

    /// Returns the workgroup memory that each row per invocation takes: the finished rows wait
    /// there for the output stores.
    pub fn row_bytes(problem: &AttentionProblem) -> u32 {
        let d4v = (problem.shape.head_dim_v as u32).div_ceil(4);
        FLASH_SUBGROUP_SIZE * (16 * d4v + 4)
    }
}

/// Sizes for the decoding fused kernel in `flash_decode.wgsl`, which gives each block of up to
/// [`FLASH_DECODE_ROWS`] packed rows a workgroup of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlashDecodeTiles {
    /// Invocations per workgroup (`WG`), each taking one run of consecutive keys.
    pub workgroup: u32,
    /// Packed query rows per workgroup (`ROWS`), which share each key and value row read.
    pub rows: u32,
    /// vec4 columns of the query/key head dim (`D4`).
    pub d4: u32,
    /// vec4 columns of the value head dim (`D4V`).
    pub d4v: u32,
    /// The width of the K and V reads.
    pub loads: RowLoads,
}

impl FlashDecodeTiles {
    /// Chooses the sizes, or returns `None` when a head dim is over
    /// [`FLASH_ROWS_MAX_HEAD_DIM`] or the merge buffers of one row do not fit the workgroup
    /// memory. Where those of all the block's rows do not fit, the block takes fewer rows.
    ///
    /// The workgroup has 8 invocations, the SIMD width of llvmpipe on 256-bit vectors. When a
    /// key/value head has at most [`FLASH_DECODE_ROWS`] packed rows, as in grouped-query
    /// decoding of up to 4 query heads per key/value head, one block takes them all and reads
    /// their K and V rows once. Otherwise blocks are as large as [`FLASH_DECODE_COLUMNS`]
    /// allows, up to [`FLASH_DECODE_ROWS`].
    pub fn choose(
        problem: &AttentionProblem,
        limits: &wgpu::Limits,
        loads: RowLoads,
    ) -> Option<Self> {
        let s = &problem.shape;
        if s.head_dim.max(s.head_dim_v) > FLASH_ROWS_MAX_HEAD_DIM {
            return None;
        }
        let workgroup = Self::workgroup(limits);
        let packed_rows = (s.group_size() * s.seq_q) as u32;
        let d4 = (s.head_dim as u32).div_ceil(4);
        let d4v = (s.head_dim_v as u32).div_ceil(4);
        let rows = if packed_rows <= FLASH_DECODE_ROWS {
            packed_rows
        } else {
            let by_columns = FLASH_DECODE_COLUMNS / (d4 + d4v);
            floor_power_of_two(by_columns.max(1)).min(FLASH_DECODE_ROWS)
        };
        let row_bytes = Self::row_bytes(problem, limits);
        let rows = rows_that_fit(rows, limits, |rows| rows * row_bytes)?;
        Some(Self {
            workgroup,
            rows,
            d4,
            d4v,
            loads,
        })
    }

    /// Returns the invocations per workgroup: 8, or fewer where the device allows fewer.
    fn workgroup(limits: &wgpu::Limits) -> u32 {
        8.min(limits.max_compute_invocations_per_workgroup)
            .min(limits.max_compute_workgroup_size_x)
    }

    /// Returns the workgroup memory that each row of a block takes: the merge keeps every
    /// invocation's state for the row there.
    pub fn row_bytes(problem: &AttentionProblem, limits: &wgpu::Limits) -> u32 {
        let d4v = (problem.shape.head_dim_v as u32).div_ceil(4);
        Self::workgroup(limits) * (12 + 16 * d4v)
    }
}

/// Maximum packed query rows per workgroup of the decoding program. Each key and value row it
/// reads serves that many rows, and each invocation keeps that many query rows and accumulators
/// in registers. More rows run faster but compile slower, because every row's loops are unrolled.
/// On lavapipe at B1 H8 S1024 D64, 2, 4 and 8 rows ran 252 to 274, 175 to 192 and 112 to 113 ms.
/// 8 rows compiled for 11.8 s, though; see [`FLASH_DECODE_COLUMNS`].
pub(crate) const FLASH_DECODE_ROWS: u32 = 4;

/// Maximum of rows × (vec4 columns of K plus those of V) in a block of the decoding program when a
/// key/value head has more rows than one block takes. It bounds the unrolled code, and with it
/// the first call's compile time. On lavapipe with Mesa's shader cache disabled, first calls
/// took 3 to 4 s at 128 (4 rows at head dim 64, or 2 at 128). They took 12 to 14 s at 256, and
/// 57 s at 512 (8 rows at head dim 128). A key/value head of at most [`FLASH_DECODE_ROWS`] packed
/// rows is one block whatever its size: in grouped-query decoding at head dim 128, 4 rows
/// compiled for 12.7 s and then ran 1.6× faster than 2 rows. (These times predate the merge's
/// rolled loop over the rows, which brought the 4 rows at head dim 128 to 8.7 to 9.6 s.)
pub(crate) const FLASH_DECODE_COLUMNS: u32 = 128;

/// Largest head dim the row-per-invocation kernel takes. On llvmpipe (Mesa 22.3) its loops over
/// the head dim's vec4 columns were unrolled up to 32 columns and not at 64, and without
/// unrolling the accumulator leaves registers and each key costs a loop iteration per column.
pub(crate) const FLASH_ROWS_MAX_HEAD_DIM: usize = 128;

impl FlashRowTiles {
    /// Chooses the sizes, or returns `None` when a head dim is over
    /// [`FLASH_ROWS_MAX_HEAD_DIM`] or no tile of 8 keys fits the workgroup memory.
    ///
    /// The workgroup covers the packed query rows rounded up to a power of two, from 8 (the
    /// SIMD width of llvmpipe on 256-bit vectors) to 64; decoding gets 8. The tile takes as many
    /// keys as workgroup memory holds, up to 64: at head dim 64 and 32 KiB, 64 keys.
    pub fn choose(problem: &AttentionProblem, limits: &wgpu::Limits) -> Option<Self> {
        let s = &problem.shape;
        if s.head_dim.max(s.head_dim_v) > FLASH_ROWS_MAX_HEAD_DIM {
            return None;
        }
        let d4 = (s.head_dim as u32).div_ceil(4);
        let d4v = (s.head_dim_v as u32).div_ceil(4);
        let packed_rows = (problem.shape.group_size() * problem.shape.seq_q).min(64) as u32;
        let workgroup = packed_rows
            .next_power_of_two()
            .clamp(8, 64)
            .min(limits.max_compute_invocations_per_workgroup)
            .min(limits.max_compute_workgroup_size_x);
        let by_memory = limits.max_compute_workgroup_storage_size / Self::key_bytes(problem);
        let tile_kv = by_memory.min(64);
        let tile_kv = if tile_kv >= FLASH_ROWS_MIN_TILE_KV {
            floor_power_of_two(tile_kv)
        } else {
            return None;
        };
        Some(Self {
            workgroup,
            tile_kv,
            d4,
            d4v,
            vec4_loads: vec4_rows(problem),
        })
    }

    /// Returns the workgroup memory that each key of a tile takes: its K and V rows.
    pub fn key_bytes(problem: &AttentionProblem) -> u32 {
        let s = &problem.shape;
        16 * ((s.head_dim as u32).div_ceil(4) + (s.head_dim_v as u32).div_ceil(4))
    }
}

/// Minimum keys per tile of the row program.
pub(crate) const FLASH_ROWS_MIN_TILE_KV: u32 = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::AttentionShape;

    /// Returns the rows per block of the decoding program on a device with `workgroup_bytes` of
    /// workgroup memory, or 0 where the program cannot run.
    fn decode_rows_within(shape: AttentionShape, workgroup_bytes: u32) -> u32 {
        let limits = wgpu::Limits {
            max_compute_workgroup_storage_size: workgroup_bytes,
            ..wgpu::Limits::default()
        };
        FlashDecodeTiles::choose(&AttentionProblem::new(shape), &limits, RowLoads::Vec4)
            .map_or(0, |tiles| tiles.rows)
    }

    /// Returns the rows per block on lavapipe, which has 32 KiB of workgroup memory.
    fn decode_rows(shape: AttentionShape) -> u32 {
        decode_rows_within(shape, 32 << 10)
    }

    #[test]
    fn decode_block_takes_whole_query_group() {
        let shape = AttentionShape::new(1, 32, 1, 4096, 128).with_kv_heads(8);
        assert_eq!(decode_rows(shape), 4);
        let shape = AttentionShape::new(1, 32, 1, 4096, 128);
        assert_eq!(decode_rows(shape), 1);
        let shape = AttentionShape::new(2, 4, 3, 50, 64);
        assert_eq!(decode_rows(shape), 3);
    }

    #[test]
    fn decode_block_shrinks_to_fit_workgroup_memory() {
        // 4 rows of 8 invocations at head dim 128 keep 4 · 8 · (12 + 512) = 16,768 bytes for
        // the merge, over WebGPU's default 16 KiB, so the block takes 2 rows (8,384 bytes).
        let group = AttentionShape::new(1, 32, 1, 4096, 128).with_kv_heads(8);
        assert_eq!(decode_rows_within(group, 16 << 10), 2);
        assert_eq!(decode_rows_within(group, 16_768), 4);
        // One row keeps 4,192 bytes.
        assert_eq!(decode_rows_within(group, 4_192), 1);
        assert_eq!(decode_rows_within(group, 4_191), 0);
    }

    #[test]
    fn prefill_block_rows_follow_head_dim() {
        assert_eq!(decode_rows(AttentionShape::new(1, 8, 1024, 1024, 32)), 4);
        assert_eq!(decode_rows(AttentionShape::new(1, 8, 1024, 1024, 64)), 4);
        assert_eq!(decode_rows(AttentionShape::new(1, 8, 1024, 1024, 128)), 2);
        let wide_values = AttentionShape::new(1, 8, 1024, 1024, 64).with_head_dim_v(128);
        assert_eq!(decode_rows(wide_values), 2);
    }

    #[test]
    fn row_loads_pick_widest_reads() {
        let all = wgpu::Features::SHADER_INT64;
        let none = wgpu::Features::empty();
        let problem = |head_dim| AttentionProblem::new(AttentionShape::new(1, 2, 3, 5, head_dim));
        assert_eq!(RowLoads::choose(&problem(64), all), RowLoads::Wide);
        assert_eq!(RowLoads::choose(&problem(64), none), RowLoads::Vec4);
        assert_eq!(RowLoads::choose(&problem(36), all), RowLoads::Vec4);
        assert_eq!(RowLoads::choose(&problem(33), all), RowLoads::Scalar);
        let f16 = |head_dim| problem(head_dim).with_dtype(Dtype::F16);
        assert_eq!(RowLoads::choose(&f16(64), all), RowLoads::WideF16);
        assert_eq!(RowLoads::choose(&f16(64), none), RowLoads::Vec4);
        // 8 halves fill only half a read of 16.
        assert_eq!(RowLoads::choose(&f16(40), all), RowLoads::Vec4);
        let wide_values =
            AttentionProblem::new(AttentionShape::new(1, 2, 3, 5, 64).with_head_dim_v(36));
        assert_eq!(RowLoads::choose(&wide_values, all), RowLoads::Vec4);
    }

    #[test]
    fn row_loads_need_aligned_queries() {
        // K and V rows in groups of 8, but each query row 2 elements past a multiple of 4: every
        // read but the scalar one takes Q a vec4 at a time.
        use crate::problem::{Layout, Strides, TensorStrides};
        let shape = AttentionShape::new(1, 2, 3, 5, 64);
        let dense = |heads: usize, rows: usize| Strides {
            batch: heads * rows * 64,
            head: rows * 64,
            seq: 64,
        };
        let strides = TensorStrides {
            q: Strides {
                batch: 2 * 3 * 66,
                head: 3 * 66,
                seq: 66,
            },
            k: dense(2, 5),
            v: dense(2, 5),
            out: dense(2, 3),
        };
        let problem = AttentionProblem::new(shape).with_layout(Layout::Strided(strides));
        let all = wgpu::Features::SHADER_INT64;
        assert_eq!(RowLoads::choose(&problem, all), RowLoads::Scalar);
        assert!(!vec4_rows(&problem));
    }

    fn subgroup_rows(shape: AttentionShape) -> u32 {
        FlashSubgroupTiles::choose(
            &AttentionProblem::new(shape),
            &wgpu::Limits::default(),
            RowLoads::Vec4,
        )
        .expect("head dims up to 128 fit")
        .rows
    }

    #[test]
    fn subgroup_rows_follow_size_and_head_dim() {
        // 8 heads of 2,048 × 2,048 and of 1,024 × 1,024 are large: 128 columns per invocation.
        assert_eq!(subgroup_rows(AttentionShape::new(1, 8, 2048, 2048, 64)), 4);
        assert_eq!(subgroup_rows(AttentionShape::new(1, 8, 1024, 1024, 128)), 2);
        assert_eq!(subgroup_rows(AttentionShape::new(1, 8, 1024, 1024, 80)), 3);
        // 8 heads of 512 × 512 are small: 32 columns, 2 rows at head dim 32.
        assert_eq!(subgroup_rows(AttentionShape::new(1, 8, 512, 512, 32)), 2);
        assert_eq!(subgroup_rows(AttentionShape::new(1, 8, 512, 512, 64)), 1);
        // The MiniLM batch is tiny: 16 columns, 1 row.
        assert_eq!(subgroup_rows(AttentionShape::new(4, 12, 128, 128, 32)), 1);
        assert_eq!(subgroup_rows(AttentionShape::new(1, 8, 512, 512, 128)), 1);
        // No more rows per invocation than a key/value head has packed rows for.
        let decode = AttentionShape::new(1, 32, 12, 1 << 20, 32).with_kv_heads(8);
        assert_eq!(subgroup_rows(decode), 4);
        let decode = AttentionShape::new(1, 32, 2, 1 << 20, 32).with_kv_heads(8);
        assert_eq!(subgroup_rows(decode), 1);
        let wide = AttentionProblem::new(AttentionShape::new(1, 1, 8, 8, 129));
        let limits = wgpu::Limits::default();
        assert!(FlashSubgroupTiles::choose(&wide, &limits, RowLoads::Vec4).is_none());
    }

    #[test]
    fn subgroup_block_shrinks_to_fit_workgroup_memory() {
        // 4 rows of 8 invocations at head dim 64 keep 4 · 8 · (16 · 16 + 4) = 8,320 bytes.
        let problem = AttentionProblem::new(AttentionShape::new(1, 8, 2048, 2048, 64));
        let rows_within = |bytes: u32| {
            let limits = wgpu::Limits {
                max_compute_workgroup_storage_size: bytes,
                ..wgpu::Limits::default()
            };
            FlashSubgroupTiles::choose(&problem, &limits, RowLoads::Vec4).map(|tiles| tiles.rows)
        };
        assert_eq!(rows_within(8_320), Some(4));
        assert_eq!(rows_within(8_319), Some(2));
        // One row keeps 2,080 bytes.
        assert_eq!(rows_within(2_080), Some(1));
        assert_eq!(rows_within(2_079), None);
    }
}
