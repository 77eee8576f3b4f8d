// Row loads for `flash_decode.wgsl` and `flash_subgroup.wgsl` when the storage is f32, the
// device has SHADER_INT64, and the head dims of K and V and all their strides are multiples of
// 8: `k` and `v` are then arrays of vec4<u64>, and each read brings 8 floats, two vec4 columns.
// llvmpipe reads memory in a loop over the SIMD lanes, one pass per read whatever its width, so
// this halves the passes of `load_rows_vec4.wgsl`. `base` is an element offset, a multiple of 8.
alias KvElement = vec4<u64>;
const READ_COLS = 2u;

// The four floats whose bits `lo` and `hi` hold, low half first, as stored in little-endian
// memory.
fn unpack_floats(lo: u64, hi: u64) -> vec4<f32> {
    return vec4<f32>(
        bitcast<f32>(u32(lo & 0xfffffffflu)),
        bitcast<f32>(u32(lo >> 32u)),
        bitcast<f32>(u32(hi & 0xfffffffflu)),
        bitcast<f32>(u32(hi >> 32u)),
    );
}

// Reads the vec4 columns 2 · i and 2 · i + 1 of the K row at element offset `base`.
fn read_k(base: u32, i: u32) -> array<vec4<f32>, READ_COLS> {
    let w = k[base / 8u + i];
    return array<vec4<f32>, 2>(unpack_floats(w.x, w.y), unpack_floats(w.z, w.w));
}

// Reads the vec4 columns 2 · i and 2 · i + 1 of the V row at element offset `base`.
fn read_v(base: u32, i: u32) -> array<vec4<f32>, READ_COLS> {
    let w = v[base / 8u + i];
    return array<vec4<f32>, 2>(unpack_floats(w.x, w.y), unpack_floats(w.z, w.w));
}
