// Row loads for `flash_rows.wgsl`, `flash_decode.wgsl` and `flash_subgroup.wgsl` when the head
// dims of K and V and all their strides are multiples of 4: `k` and `v` are then arrays of
// vec4, and each load is one vector load instead of four scalar ones. `base` is an element
// offset, a multiple of 4.
alias KvElement = vec4<Storage>;
const READ_COLS = 2u;

// Reads the vec4 column `c4` of the K row at element offset `base`.
fn load_k(base: u32, c4: u32) -> vec4<f32> {
    return vec4<f32>(k[base / 4u + c4]);
}

// Reads the vec4 column `c4` of the V row at element offset `base`.
fn load_v(base: u32, c4: u32) -> vec4<f32> {
    return vec4<f32>(v[base / 4u + c4]);
}

// Reads the vec4 columns 2 · i and 2 · i + 1 of the K row at element offset `base`. A column
// past the row, when D4 is odd, repeats the last one, which the caller does not use.
fn read_k(base: u32, i: u32) -> array<vec4<f32>, READ_COLS> {
    return array<vec4<f32>, 2>(load_k(base, 2u * i), load_k(base, min(2u * i + 1u, D4 - 1u)));
}

// Reads the vec4 columns 2 · i and 2 · i + 1 of the V row at element offset `base`, as read_k
// does.
fn read_v(base: u32, i: u32) -> array<vec4<f32>, READ_COLS> {
    return array<vec4<f32>, 2>(load_v(base, 2u * i), load_v(base, min(2u * i + 1u, D4V - 1u)));
}
