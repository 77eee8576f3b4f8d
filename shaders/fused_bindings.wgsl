// The bindings of the fused programs (`flash.wgsl`, `flash_rows.wgsl`, `flash_decode.wgsl` and
// `flash_subgroup.wgsl`), which come after this file, and the query reads of the last three.
// `KvElement`, the element type of K and V, comes from the row-load file ahead of a row
// program, or from `flash.wgsl`.

@group(0) @binding(0) var<uniform> params: Params;
// Queries, keys and values, addressed through q_offset, k_offset and v_offset.
@group(0) @binding(1) var<storage, read> q: array<Storage>;
@group(0) @binding(2) var<storage, read> k: array<KvElement>;
@group(0) @binding(3) var<storage, read> v: array<KvElement>;
// [mask_batch, mask_heads, seq_q, seq_kv]; one unused element when has_mask is 0.
@group(0) @binding(4) var<storage, read> mask: array<f32>;
// The output and log-sum-exp, addressed through out_offset and lse_offset; written when
// kv_splits is 1.
@group(0) @binding(5) var<storage, read_write> out: array<Storage>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;
// With several splits: each split's output normalized by its own sum,
// [kv_splits, batch, heads, seq_q, head_dim_v], then its running maximum and sum,
// [kv_splits, batch, heads, seq_q, 2].
@group(0) @binding(7) var<storage, read_write> partial: array<f32>;
// Per-head and per-sequence values; see params.wgsl.
@group(0) @binding(8) var<storage, read> aux: array<u32>;

// Reads the vec4 column `c4` of the query row at element offset `base`, zero past head_dim. The
// row is scaled here, once, instead of in every score.
fn load_q(base: u32, c4: u32) -> vec4<f32> {
    var value = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        let col = 4u * c4 + e;
        if col < params.head_dim {
            value[e] = params.scale * f32(q[base + col]);
        }
    }
    return value;
}
