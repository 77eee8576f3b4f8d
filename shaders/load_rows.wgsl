// Row loads shared by the programs that read K and V rows into private vec4 arrays
// (`flash_rows.wgsl`, `flash_decode.wgsl` and `flash_subgroup.wgsl`), which declare `k` and `v`
// as arrays of `KvElement`. This version reads one element at a time, for any head dim and
// strides; `load_rows_vec4.wgsl` reads whole vec4s, and `load_rows_u64.wgsl` and
// `load_rows_u64_f16.wgsl` 8 floats or 16 halves at a time, where the rows allow it. The first
// program reads through load_k and load_v, the other two through read_k and read_v, READ_COLS
// vec4 columns at a time.
alias QElement = Storage;
alias KvElement = Storage;
const READ_COLS = 2u;

// Reads the vec4 column `c4` of the query row at element offset `base`, zero past head_dim, and
// scales it here, once, instead of in every score. Clamped loads and a select, as in load_k.
fn load_q(base: u32, c4: u32) -> vec4<f32> {
    let last = params.head_dim - 1u;
    let col = vec4<u32>(4u * c4) + vec4<u32>(0u, 1u, 2u, 3u);
    let value = vec4<f32>(
        f32(q[base + min(col.x, last)]),
        f32(q[base + min(col.y, last)]),
        f32(q[base + min(col.z, last)]),
        f32(q[base + min(col.w, last)]),
    );
    return params.scale * select(vec4<f32>(0.0), value, col <= vec4<u32>(last));
}

// Reads four consecutive elements of K at `base + 4 · c4`, zero past head_dim. The loads are
// clamped to the row and masked with select rather than a branch, which keeps the unrolled
// callers free of control flow (a branch per element made llvmpipe's compile several times
// slower).
fn load_k(base: u32, c4: u32) -> vec4<f32> {
    let last = params.head_dim - 1u;
    let col = vec4<u32>(4u * c4) + vec4<u32>(0u, 1u, 2u, 3u);
    let value = vec4<f32>(
        f32(k[base + min(col.x, last)]),
        f32(k[base + min(col.y, last)]),
        f32(k[base + min(col.z, last)]),
        f32(k[base + min(col.w, last)]),
    );
    return select(vec4<f32>(0.0), value, col <= vec4<u32>(last));
}

// Reads four consecutive elements of V at `base + 4 · c4`, zero past head_dim_v, as load_k does.
fn load_v(base: u32, c4: u32) -> vec4<f32> {
    let last = params.head_dim_v - 1u;
    let col = vec4<u32>(4u * c4) + vec4<u32>(0u, 1u, 2u, 3u);
    let value = vec4<f32>(
        f32(v[base + min(col.x, last)]),
        f32(v[base + min(col.y, last)]),
        f32(v[base + min(col.z, last)]),
        f32(v[base + min(col.w, last)]),
    );
    return select(vec4<f32>(0.0), value, col <= vec4<u32>(last));
}

// Reads the vec4 columns 2 · i and 2 · i + 1 of the K row at element offset `base`, zero past
// head_dim.
fn read_k(base: u32, i: u32) -> array<vec4<f32>, READ_COLS> {
    return array<vec4<f32>, 2>(load_k(base, 2u * i), load_k(base, 2u * i + 1u));
}

// Reads the vec4 columns 2 · i and 2 · i + 1 of the V row at element offset `base`, zero past
// head_dim_v.
fn read_v(base: u32, i: u32) -> array<vec4<f32>, READ_COLS> {
    return array<vec4<f32>, 2>(load_v(base, 2u * i), load_v(base, 2u * i + 1u));
}
