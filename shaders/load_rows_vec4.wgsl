// Row loads for `flash_rows.wgsl`, `flash_decode.wgsl` and `flash_subgroup.wgsl` when the head
// dims of K and V and all their strides are multiples of 4: `k` and `v` are then arrays of
// vec4, and each load is one vector load instead of four scalar ones. `base` is an element
// offset, a multiple of 4.
alias KvElement = vec4<Storage>;

// Reads the vec4 column `c4` of the K row at element offset `base`.
fn load_k(base: u32, c4: u32) -> vec4<f32> {
    return vec4<f32>(k[base / 4u + c4]);
}

// Reads the vec4 column `c4` of the V row at element offset `base`.
fn load_v(base: u32, c4: u32) -> vec4<f32> {
    return vec4<f32>(v[base / 4u + c4]);
}

// Reads the vec4 columns 2 · c8 and 2 · c8 + 1 of the K row at element offset `base`. A column
// past the row, when D4 is odd, repeats the last one, which the caller does not use.
fn load_k8(base: u32, c8: u32) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(load_k(base, 2u * c8), load_k(base, min(2u * c8 + 1u, D4 - 1u)));
}

// Reads the vec4 columns 2 · c8 and 2 · c8 + 1 of the V row at element offset `base`, as
// load_k8 does.
fn load_v8(base: u32, c8: u32) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(load_v(base, 2u * c8), load_v(base, min(2u * c8 + 1u, D4V - 1u)));
}
