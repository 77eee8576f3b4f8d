// Row loads for `flash_decode.wgsl` and `flash_subgroup.wgsl` when the storage is f16, the
// device has SHADER_INT64, and the head dims of K and V and all their strides are multiples of
// 16: `k` and `v` are then arrays of vec4<u64>, and each read brings 16 halves, four vec4
// columns. `load_rows_vec4.wgsl` would read them as 16 separate 16-bit elements in 4 reads, and
// llvmpipe runs every read as a loop over the SIMD lanes. `base` is an element offset, a
// multiple of 16.
alias KvElement = vec4<u64>;
const READ_COLS = 4u;

// The four values whose f16 bits `bits` holds, lowest first, as stored in little-endian memory.
fn unpack_halves(bits: u64) -> vec4<f32> {
    return vec4<f32>(
        unpack2x16float(u32(bits & 0xfffffffflu)),
        unpack2x16float(u32(bits >> 32u)),
    );
}

// The four vec4 columns that one read `w` holds.
fn unpack_read(w: vec4<u64>) -> array<vec4<f32>, READ_COLS> {
    return array<vec4<f32>, 4>(
        unpack_halves(w.x),
        unpack_halves(w.y),
        unpack_halves(w.z),
        unpack_halves(w.w),
    );
}

// Reads the vec4 columns 4 · i to 4 · i + 3 of the K row at element offset `base`.
fn read_k(base: u32, i: u32) -> array<vec4<f32>, READ_COLS> {
    return unpack_read(k[base / 16u + i]);
}

// Reads the vec4 columns 4 · i to 4 · i + 3 of the V row at element offset `base`.
fn read_v(base: u32, i: u32) -> array<vec4<f32>, READ_COLS> {
    return unpack_read(v[base / 16u + i]);
}
