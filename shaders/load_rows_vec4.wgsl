// Row loads for `flash_rows.wgsl` and `flash_decode.wgsl` when the head dims of K and V and
// all their strides are multiples of 4: `k` and `v` are then arrays of vec4, and each load is
// one vector load instead of four scalar ones. `base` is an element offset, a multiple of 4.
alias KvElement = vec4<Storage>;

// Reads the vec4 column `c4` of the K row at element offset `base`.
fn load_k(base: u32, c4: u32) -> vec4<f32> {
    return vec4<f32>(k[base / 4u + c4]);
}

// Reads the vec4 column `c4` of the V row at element offset `base`.
fn load_v(base: u32, c4: u32) -> vec4<f32> {
    return vec4<f32>(v[base / 4u + c4]);
}
