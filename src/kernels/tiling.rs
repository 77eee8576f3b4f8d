//! Tile and workgroup sizes, chosen in one place from the problem and the device limits.
//!
//! Each shader declares its sizes as `override` constants with the same names as the fields here,
//! and the host derives its dispatch grids from the same values.

use crate::problem::AttentionProblem;

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
        let softmax_cap = 1 << (31 - softmax_cap.leading_zeros());
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
    /// Key lanes (`WG_KV`): keys per tile, and the stride of each invocation's output columns.
    pub key_lanes: u32,
    /// Row lanes (`WG_Q`); each owns [`FLASH_ROWS`] query rows.
    pub row_lanes: u32,
    /// Output columns per invocation (`D_COLS`), `ceil(head_dim / key_lanes)`.
    pub d_cols: u32,
}

/// Query rows per invocation of the fused kernel (`ROWS` in `flash.wgsl`).
pub(crate) const FLASH_ROWS: u32 = 4;

impl FlashTiles {
    /// Query rows per workgroup.
    pub fn block_q(&self) -> u32 {
        self.row_lanes * FLASH_ROWS
    }

    /// Workgroup memory the kernel declares, in bytes: the Q block, one K/V tile, and the
    /// score and probability tiles.
    pub fn workgroup_bytes(&self) -> u32 {
        let d_pad = self.key_lanes * self.d_cols;
        let block_q = self.block_q();
        4 * (block_q * d_pad + self.key_lanes * d_pad + 2 * block_q * self.key_lanes)
    }

    /// Chooses the sizes, or returns `None` when even the smallest block does not fit the
    /// device's workgroup memory.
    ///
    /// Keys go 16 to a tile, one per key lane, so a tile's scores take one pass over the head
    /// dim per invocation and row. The row lanes are the largest of 16, 8, 4, 2 and 1 whose
    /// workgroup memory fits the limit and whose block does not exceed the query rows by more
    /// than one step: more rows per block reuse each K/V tile more, but a block far taller than
    /// `seq_q` (decoding) only adds idle rows. At head dim 64 and 32 KiB that is 16 row lanes
    /// (64 rows, 24.5 KiB); at head dim 256 it is 2 (8 rows, 25 KiB).
    pub fn choose(problem: &AttentionProblem, limits: &wgpu::Limits) -> Option<Self> {
        let key_lanes = 16;
        let d_cols = (problem.shape.head_dim as u32).div_ceil(key_lanes);
        let wanted_rows = problem.shape.seq_q as u32;
        [16, 8, 4, 2, 1].into_iter().find_map(|row_lanes| {
            let tiles = Self {
                key_lanes,
                row_lanes,
                d_cols,
            };
            let fits_memory = tiles.workgroup_bytes() <= limits.max_compute_workgroup_storage_size;
            let fits_invocations = key_lanes * row_lanes
                <= limits.max_compute_invocations_per_workgroup
                && row_lanes <= limits.max_compute_workgroup_size_y
                && key_lanes <= limits.max_compute_workgroup_size_x;
            let not_too_tall = row_lanes == 1 || (row_lanes / 2) * FLASH_ROWS < wanted_rows;
            (fits_memory && fits_invocations && not_too_tall).then_some(tiles)
        })
    }
}
