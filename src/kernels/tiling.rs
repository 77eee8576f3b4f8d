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
