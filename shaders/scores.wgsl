// Stage 1 of the three-stage path: S = cap(scale · Q Kᵀ) + ALiBi bias + mask, with the entries
// that the causal mask, the window or the key length forbids set to -inf.
//
// Each workgroup computes one TILE_Q × TILE_KV block of S for one (batch, head). Its
// WG_KV × WG_Q invocations each own ROWS × COLS entries, strided so that neighbouring
// invocations write neighbouring columns. Q and K are staged through workgroup memory TILE_D
// head-dim columns at a time, with zeros past the edges, so any head_dim and sequence length work.

const ROWS: u32 = 4u;
const COLS: u32 = 4u;
// Invocations along seq_q and seq_kv, and head-dim columns staged per step. The host sets them
// in `kernels::tiling` and computes the dispatch grid from the same values.
override WG_Q: u32 = 16u;
override WG_KV: u32 = 16u;
override TILE_D: u32 = 16u;

@group(0) @binding(0) var<uniform> params: Params;
// Queries and keys, addressed through params.q_strides and params.k_strides.
@group(0) @binding(1) var<storage, read> q: array<Storage>;
@group(0) @binding(2) var<storage, read> k: array<Storage>;
// [mask_batch, mask_heads, seq_q, seq_kv]; one unused element when has_mask is 0.
@group(0) @binding(3) var<storage, read> mask: array<f32>;
// [heads of this chunk, seq_q, seq_kv], starting at head bh_offset.
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;
// Per-head and per-sequence values; see params.wgsl.
@group(0) @binding(5) var<storage, read> aux: array<u32>;

// Q rows of the tile, [TILE_Q][TILE_D]: WG_Q · ROWS · TILE_D · 4 bytes (4 KiB at the defaults).
var<workgroup> q_tile: array<f32, WG_Q * ROWS * TILE_D>;
// K rows of the tile stored transposed, [TILE_D][TILE_KV], so that neighbouring invocations read
// neighbouring words: WG_KV · COLS · TILE_D · 4 bytes (4 KiB at the defaults).
var<workgroup> k_tile: array<f32, WG_KV * COLS * TILE_D>;

@compute @workgroup_size(WG_KV, WG_Q, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_id) local_id: vec3<u32>,
    @builtin(local_invocation_index) local_index: u32,
) {
    let tile_q = WG_Q * ROWS;
    let tile_kv = WG_KV * COLS;
    let invocations = WG_Q * WG_KV;
    let group = workgroup_id + params.group_offset;
    let head = chunk_head(group.z);
    let d = params.head_dim;
    let seq = sequence(head.b);
    let row0 = group.y * tile_q;
    let col0 = group.x * tile_kv;

    // A tile past the sequence's rows, or whose every key is masked by the causal mask, the
    // window or the key length for every row, skips the products. The test depends only on
    // workgroup-uniform values, so the barriers below stay in uniform control flow.
    let row_end = min(row0 + tile_q, seq.rows);
    let computes = row0 < seq.rows && col0 < block_key_end(seq, row_end)
        && col0 + tile_kv > window_key_begin(seq, row0);

    var acc: array<f32, ROWS * COLS>;
    if computes {
        for (var d0 = 0u; d0 < d; d0 += TILE_D) {
            // Load Q: [tile_q][TILE_D], scaled as the fused programs scale it, so that the
            // products stay within f32 where the scaled scores do. Zero past the sequence's rows
            // and head_dim.
            for (var t = local_index; t < tile_q * TILE_D; t += invocations) {
                let row = row0 + t / TILE_D;
                let col = d0 + t % TILE_D;
                var value = 0.0;
                if row < seq.rows && col < d {
                    let index = q_offset(head.b, head.h, seq.row_begin + row) + col;
                    value = f32(q[index]) * params.scale;
                }
                q_tile[t] = value;
            }
            // Load K transposed: k_tile[c][key], zero past the key limit and head_dim.
            for (var t = local_index; t < tile_kv * TILE_D; t += invocations) {
                let key = t / TILE_D;
                let c = t % TILE_D;
                var value = 0.0;
                if col0 + key < seq.key_limit && d0 + c < d {
                    let row = k_offset(head.b, head.kv_head, seq.key_begin + col0 + key);
                    value = f32(k[row + d0 + c]);
                }
                k_tile[c * tile_kv + key] = value;
            }
            workgroupBarrier();

            // Each staged block of TILE_D columns is summed on its own and then added to the
            // score, which rounds a dot product of d terms about as much as one of
            // TILE_D + d / TILE_D terms instead of d.
            var block: array<f32, ROWS * COLS>;
            for (var c = 0u; c < TILE_D; c++) {
                var q_values: array<f32, ROWS>;
                for (var r = 0u; r < ROWS; r++) {
                    q_values[r] = q_tile[(local_id.y + r * WG_Q) * TILE_D + c];
                }
                for (var cc = 0u; cc < COLS; cc++) {
                    let k_value = k_tile[c * tile_kv + local_id.x + cc * WG_KV];
                    for (var r = 0u; r < ROWS; r++) {
                        block[r * COLS + cc] = fma(q_values[r], k_value, block[r * COLS + cc]);
                    }
                }
            }
            for (var i = 0u; i < ROWS * COLS; i++) {
                acc[i] += block[i];
            }
            workgroupBarrier();
        }
    }

    // Scale, cap, add the bias and the mask, apply the causal mask and window, write. Rows past
    // the sequence are not written; the softmax stage fills them with zeros.
    let mask_base = head.b * params.mask_batch_stride + head.h * params.mask_head_stride;
    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + local_id.y + r * WG_Q;
        if row >= seq.rows {
            continue;
        }
        let keys = key_range(seq, row);
        let slope = alibi_slope(head.h);
        let diag = diagonal(seq, row);
        for (var cc = 0u; cc < COLS; cc++) {
            let col = col0 + local_id.x + cc * WG_KV;
            if col >= params.seq_kv {
                continue;
            }
            var s = cap_score(acc[r * COLS + cc]) + alibi_bias(slope, diag, col);
            if params.has_mask != 0u {
                s += mask[mask_base + row * params.seq_kv + col];
            }
            if col < keys.x || col >= keys.y {
                s = neg_inf();
            }
            scores[(head.chunk_index * params.seq_q + row) * params.seq_kv + col] = s;
        }
    }
}
