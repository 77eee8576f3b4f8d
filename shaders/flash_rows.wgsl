// Fused attention with one query row per invocation, for CPU adapters such as llvmpipe.
//
// Same semantics, splits and outputs as `flash.wgsl`. Each invocation keeps its query row
// (pre-multiplied by the scale) and its output accumulator in private vec4 arrays, and the
// workgroup stages TILE_KV keys and values at a time in workgroup memory. On a CPU driver that
// runs invocations as SIMD lanes, the arithmetic then runs across rows in SIMD with no
// cross-lane exchange. Each read of the staged K and V is still one load per lane on llvmpipe,
// which treats an address as uniform only when it is built from constants and uniforms, never
// from a loop counter. On GPUs this design needs about 2 · head_dim registers per invocation,
// which is why `flash.wgsl` is used there.

// Upper bounds of the private arrays: 128 / 4 vec4 columns, and the largest tile.
const MAX_D4: u32 = 32u;
const MAX_TILE_KV: u32 = 64u;
// Rows per workgroup, one per invocation.
override WG: u32 = 64u;
// Keys staged per tile, at most MAX_TILE_KV.
override TILE_KV: u32 = 32u;
// vec4 columns of the query/key head dim and of the value head dim, ceil(head_dim / 4), at
// most MAX_D4 each.
override D4: u32 = 16u;
override D4V: u32 = 16u;

// The bindings and load_q come from fused_bindings.wgsl.

// K and V of the tile, [TILE_KV][D4] and [TILE_KV][D4V]: TILE_KV · (D4 + D4V) · 16 bytes.
var<workgroup> k_tile: array<vec4<f32>, TILE_KV * D4>;
var<workgroup> v_tile: array<vec4<f32>, TILE_KV * D4V>;

@compute @workgroup_size(WG, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_index) local_index: u32,
) {
    let group = workgroup_id + params.group_offset;
    let bkv = group.z;
    let b = bkv / params.kv_heads;
    let kv_head = bkv % params.kv_heads;
    let packed_rows = packed_rows_per_kv_head();
    let packed0 = group.x * WG;
    let split = group.y;
    let seq = sequence(b);
    // The condition is the same for the whole workgroup, so no barrier below is skipped by some
    // invocations only.
    if split >= active_splits(seq) {
        return;
    }

    // This invocation's row, and its query row, scaled, and zero past the end.
    let row = packed_row(b, kv_head, seq, packed0 + local_index);
    var q_row: array<vec4<f32>, MAX_D4>;
    for (var c4 = 0u; c4 < D4; c4++) {
        q_row[c4] = select(vec4<f32>(0.0), load_q(row.q_base, c4), row.valid);
    }

    // Keys of this split that some row of the block may attend to.
    let keys = block_keys(seq, packed0, WG, packed_rows, split);
    let key_begin = keys.x;
    let key_end = keys.y;

    // The sink joins the first split's sum as a score with no value row.
    // `poisoned` records a NaN or +inf score, which makes the row NaN as in the reference.
    var m = neg_inf();
    var l = 0.0;
    var poisoned = false;
    let sink = sink_logit(row.head);
    if split == 0u && sink != neg_inf() {
        m = sink;
        l = 1.0;
        poisoned = poisons_row(sink);
    }
    var acc: array<vec4<f32>, MAX_D4>;
    for (var j0 = key_begin; j0 < key_end; j0 += TILE_KV) {
        // Stage K and V, zero past key_end and the head dims.
        for (var t = local_index; t < TILE_KV * D4; t += WG) {
            let key = j0 + t / D4;
            var k_value = vec4<f32>(0.0);
            if key < key_end {
                k_value = load_k(k_offset(b, kv_head, seq.key_begin + key), t % D4);
            }
            k_tile[t] = k_value;
        }
        for (var t = local_index; t < TILE_KV * D4V; t += WG) {
            let key = j0 + t / D4V;
            var v_value = vec4<f32>(0.0);
            if key < key_end {
                v_value = load_v(v_offset(b, kv_head, seq.key_begin + key), t % D4V);
            }
            v_tile[t] = v_value;
        }
        workgroupBarrier();

        // Scores of the tile and their maximum.
        var s: array<f32, MAX_TILE_KV>;
        var tile_max = neg_inf();
        for (var j = 0u; j < TILE_KV; j++) {
            var dot4 = vec4<f32>(0.0);
            for (var c4 = 0u; c4 < D4; c4++) {
                dot4 = fma(q_row[c4], k_tile[j * D4 + c4], dot4);
            }
            let key = j0 + j;
            var score = dot4.x + dot4.y + dot4.z + dot4.w;
            score = cap_score(score) + alibi_bias(row.slope, row.diagonal, key);
            if key < row.keys.x || key >= min(row.keys.y, key_end) {
                score = neg_inf();
            } else if params.has_mask != 0u {
                score += mask[row.mask_row + key];
            }
            s[j] = score;
            poisoned = poisoned || poisons_row(score);
            tile_max = max(tile_max, score);
        }

        // Online softmax update, then P V. Until a row has seen a key, new_max is -inf and
        // exp(-inf - -inf) would be NaN, so such a row rescales by 1 and adds nothing. The update
        // has no branches, so the reads of the V tile stay in uniform control flow.
        let new_max = max(m, tile_max);
        let seen = new_max != neg_inf();
        let alpha = select(1.0, exp(m - new_max), seen);
        l *= alpha;
        for (var c4 = 0u; c4 < D4V; c4++) {
            acc[c4] *= alpha;
        }
        // A key of probability 0, such as a masked one, leaves the accumulator as it is, so a
        // NaN or infinity in its value row cannot reach the output.
        for (var j = 0u; j < TILE_KV; j++) {
            let p = select(0.0, exp(s[j] - new_max), seen);
            l += p;
            for (var c4 = 0u; c4 < D4V; c4++) {
                let sum = fma(vec4<f32>(p), v_tile[j * D4V + c4], acc[c4]);
                // p == 0.0, not p != 0.0: the ordered test keeps a NaN p, which must propagate.
                acc[c4] = select(sum, acc[c4], p == 0.0);
            }
        }
        m = new_max;
        workgroupBarrier();
    }

    if !row.valid {
        return;
    }
    let inv_sum = select(1.0 / l, 0.0, m == neg_inf());
    let stores = row_stores(b, seq, row, split);
    // The test on the splits stays outside the loops: inside them, through store_output, it made
    // this program 1.2× slower on lavapipe (B1 H8 S512 D64: 166 to 171 ms against 134 to 138 ms).
    if stores.direct {
        for (var c4 = 0u; c4 < D4V; c4++) {
            for (var e = 0u; e < 4u; e++) {
                let col = 4u * c4 + e;
                if col < params.head_dim_v {
                    let value = select(acc[c4][e] * inv_sum, nan(), poisoned);
                    out[stores.out_base + col] = Storage(value);
                }
            }
        }
    } else {
        for (var c4 = 0u; c4 < D4V; c4++) {
            for (var e = 0u; e < 4u; e++) {
                let col = 4u * c4 + e;
                if col < params.head_dim_v {
                    partial[stores.partial_base + col] = acc[c4][e] * inv_sum;
                }
            }
        }
    }
    store_row_stats(stores, m, l, poisoned);
}
