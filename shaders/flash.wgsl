// Fused attention: scores, online softmax and P V in one pass, never storing the score matrix.
//
// A workgroup owns one (batch, key/value head), one block of BLOCK_Q = WG_Q · ROWS query rows
// and one split of the key range. The rows are packed over the query heads that share the
// key/value head (packed row r is query head kv_head · group + r / seq_q, position r % seq_q),
// so with grouped-query attention each K/V tile is read once for the whole group. The Q block
// stays in workgroup memory while keys and values stream through in tiles of
// TILE_KV = WG_KV · KEYS keys. For each tile:
//   1. every invocation (x = key lane, y = row lane) computes a ROWS × KEYS block of scores in
//      registers, from the Q block and the K tile (stored transposed, so neighbouring lanes read
//      neighbouring words), and publishes each row's maximum over its keys;
//   2. the row maximum over the tile updates the running maximum m; the running sum l and the
//      output accumulator are rescaled by exp(m_old - m_new), and each invocation writes
//      p = exp(s - m_new) for its scores;
//   3. each invocation adds P times the V tile to its ROWS × D_COLS outputs (columns
//      x, x + WG_KV, ...).
// m, l and the accumulator are f32. Tiles that the causal mask hides from every row of the block
// are skipped. A row that sees no key keeps m = -inf and l = 0, and its output is 0.
//
// With one split the kernel writes the output and log-sum-exp. With several, each split writes
// its normalized partial output and its (m, l) pair, and `combine.wgsl` merges them.

const ROWS: u32 = 4u;
// Upper bounds of KEYS and D_COLS, which size the per-invocation register arrays.
const MAX_KEYS: u32 = 4u;
// MAX_HEAD_DIM / WG_KV = 256 / 16.
const MAX_D_COLS: u32 = 16u;
// Key lanes, which are also the stride of each invocation's keys and output columns.
override WG_KV: u32 = 16u;
// Row lanes; BLOCK_Q = WG_Q · ROWS.
override WG_Q: u32 = 16u;
// Keys per lane per tile, at most MAX_KEYS.
override KEYS: u32 = 4u;
// Output columns per invocation, ceil(head_dim / WG_KV), at most MAX_D_COLS. Overrides make the
// loops over KEYS and D_COLS constant-bounded, so the register arrays need no dynamic indexing.
override D_COLS: u32 = 4u;

@group(0) @binding(0) var<uniform> params: Params;
// [batch, heads, seq_q, head_dim]
@group(0) @binding(1) var<storage, read> q: array<Storage>;
// [batch, kv_heads, seq_kv, head_dim]
@group(0) @binding(2) var<storage, read> k: array<Storage>;
// [batch, kv_heads, seq_kv, head_dim]
@group(0) @binding(3) var<storage, read> v: array<Storage>;
// [mask_batch, mask_heads, seq_q, seq_kv]; one unused element when has_mask is 0.
@group(0) @binding(4) var<storage, read> mask: array<f32>;
// [batch, heads, seq_q, head_dim]; written when kv_splits is 1.
@group(0) @binding(5) var<storage, read_write> out: array<Storage>;
// [batch, heads, seq_q]; written when kv_splits is 1.
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;
// [kv_splits, batch, heads, seq_q, head_dim]: each split's output, normalized by its own sum.
@group(0) @binding(7) var<storage, read_write> partial_out: array<f32>;
// [kv_splits, batch, heads, seq_q, 2]: each split's running maximum and sum.
@group(0) @binding(8) var<storage, read_write> partial_stats: array<f32>;

// The Q block, [BLOCK_Q][WG_KV · D_COLS], zero-padded: WG_Q · ROWS · WG_KV · D_COLS · 4 bytes.
var<workgroup> q_block: array<f32, WG_Q * ROWS * WG_KV * D_COLS>;
// The K tile as [WG_KV · D_COLS][TILE_KV], then the V tile as [TILE_KV][WG_KV · D_COLS]:
// WG_KV · KEYS · WG_KV · D_COLS · 4 bytes.
var<workgroup> kv_tile: array<f32, WG_KV * KEYS * WG_KV * D_COLS>;
// Probabilities of the tile, [BLOCK_Q][TILE_KV]: WG_Q · ROWS · WG_KV · KEYS · 4 bytes.
var<workgroup> p_tile: array<f32, WG_Q * ROWS * WG_KV * KEYS>;
// Each lane's maximum score per row, [BLOCK_Q][WG_KV]: WG_Q · ROWS · WG_KV · 4 bytes.
var<workgroup> lane_max: array<f32, WG_Q * ROWS * WG_KV>;

// Flat index of query row (b, h, i) in [batch, heads, seq_q].
fn query_row(b: u32, packed: u32, kv_head: u32) -> u32 {
    let group = params.heads / params.kv_heads;
    let h = kv_head * group + packed / params.seq_q;
    return (b * params.heads + h) * params.seq_q + packed % params.seq_q;
}

@compute @workgroup_size(WG_KV, WG_Q, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_id) local_id: vec3<u32>,
    @builtin(local_invocation_index) local_index: u32,
) {
    let block_q = WG_Q * ROWS;
    let tile_kv = WG_KV * KEYS;
    let d_pad = WG_KV * D_COLS;
    let invocations = WG_Q * WG_KV;
    let group = workgroup_id + params.group_offset;
    let bkv = group.z;
    let b = bkv / params.kv_heads;
    let kv_head = bkv % params.kv_heads;
    let packed_rows = (params.heads / params.kv_heads) * params.seq_q;
    let packed0 = group.x * block_q;
    let split = group.y;
    let d = params.head_dim;
    let kv_base = bkv * params.seq_kv * d;
    let lane = local_id.x;

    // Load the Q block once, zero past the packed rows and head_dim.
    for (var t = local_index; t < block_q * d_pad; t += invocations) {
        let packed = packed0 + t / d_pad;
        let col = t % d_pad;
        var value = 0.0;
        if packed < packed_rows && col < d {
            value = f32(q[query_row(b, packed, kv_head) * d + col]);
        }
        q_block[t] = value;
    }

    // This invocation's rows: flat query row, position and mask row, or valid = false past the end.
    var row_index: array<u32, ROWS>;
    var row_position: array<u32, ROWS>;
    var row_valid: array<bool, ROWS>;
    var mask_row: array<u32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        let packed = packed0 + local_id.y + r * WG_Q;
        row_valid[r] = packed < packed_rows;
        let index = query_row(b, min(packed, packed_rows - 1u), kv_head);
        row_index[r] = index;
        row_position[r] = index % params.seq_q;
        let h = (index / params.seq_q) % params.heads;
        mask_row[r] = b * params.mask_batch_stride + h * params.mask_head_stride
            + row_position[r] * params.seq_kv;
    }

    // Keys of this split that some row of the block may attend to. A block that spans two query
    // heads covers positions 0 to seq_q - 1.
    let last_packed = min(packed0 + block_q, packed_rows) - 1u;
    var first_position = packed0 % params.seq_q;
    var last_position = last_packed % params.seq_q;
    if last_packed / params.seq_q != packed0 / params.seq_q {
        first_position = 0u;
        last_position = params.seq_q - 1u;
    }
    let split_begin = split * params.keys_per_split;
    let key_begin = max(split_begin, window_key_begin(params, first_position));
    let key_end = min(block_key_end(params, last_position + 1u), split_begin + params.keys_per_split);

    var m: array<f32, ROWS>;
    var l: array<f32, ROWS>;
    var acc: array<f32, ROWS * MAX_D_COLS>;
    for (var r = 0u; r < ROWS; r++) {
        m[r] = neg_inf();
    }

    for (var j0 = key_begin; j0 < key_end; j0 += tile_kv) {
        // Stage K transposed, kv_tile[c][key], zero past key_end and head_dim.
        for (var t = local_index; t < tile_kv * d_pad; t += invocations) {
            let key = t / d_pad;
            let c = t % d_pad;
            var value = 0.0;
            if j0 + key < key_end && c < d {
                value = f32(k[kv_base + (j0 + key) * d + c]);
            }
            kv_tile[c * tile_kv + key] = value;
        }
        workgroupBarrier();

        // 1. Scores for ROWS rows × KEYS keys.
        var s: array<f32, ROWS * MAX_KEYS>;
        for (var c = 0u; c < d_pad; c++) {
            var q_values: array<f32, ROWS>;
            for (var r = 0u; r < ROWS; r++) {
                q_values[r] = q_block[(local_id.y + r * WG_Q) * d_pad + c];
            }
            for (var kk = 0u; kk < KEYS; kk++) {
                let k_value = kv_tile[c * tile_kv + lane + kk * WG_KV];
                for (var r = 0u; r < ROWS; r++) {
                    s[r * MAX_KEYS + kk] = fma(q_values[r], k_value, s[r * MAX_KEYS + kk]);
                }
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            var row_max = neg_inf();
            for (var kk = 0u; kk < KEYS; kk++) {
                let key = j0 + lane + kk * WG_KV;
                var score = cap_score(params, params.scale * s[r * MAX_KEYS + kk]);
                if !row_valid[r] || key >= key_end || !allows(params, row_position[r], key) {
                    score = neg_inf();
                } else if params.has_mask != 0u {
                    score += mask[mask_row[r] + key];
                }
                s[r * MAX_KEYS + kk] = score;
                row_max = max(row_max, score);
            }
            lane_max[(local_id.y + r * WG_Q) * WG_KV + lane] = row_max;
        }
        workgroupBarrier();

        // Stage V into the same memory, kv_tile[key][c]; every read of K ended at the barrier.
        for (var t = local_index; t < tile_kv * d_pad; t += invocations) {
            let key = j0 + t / d_pad;
            let c = t % d_pad;
            var value = 0.0;
            if key < key_end && c < d {
                value = f32(v[kv_base + key * d + c]);
            }
            kv_tile[t] = value;
        }

        // 2. Online softmax update. Every lane of a row computes the same maximum and scale.
        var alpha: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            let local_row = local_id.y + r * WG_Q;
            var tile_max = neg_inf();
            for (var x = 0u; x < WG_KV; x++) {
                tile_max = max(tile_max, lane_max[local_row * WG_KV + x]);
            }
            let new_max = max(m[r], tile_max);
            // Until a row has seen a key, new_max is -inf and exp(-inf - -inf) would be NaN.
            let seen = new_max != neg_inf();
            alpha[r] = select(1.0, exp(m[r] - new_max), seen);
            for (var kk = 0u; kk < KEYS; kk++) {
                let p = select(0.0, exp(s[r * MAX_KEYS + kk] - new_max), seen);
                p_tile[local_row * tile_kv + lane + kk * WG_KV] = p;
            }
            m[r] = new_max;
        }
        workgroupBarrier();

        // 3. Rescale, then add P V for this invocation's rows and columns. The key loop is
        // outermost so each staged V value serves all ROWS rows.
        var tile_sum: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            for (var c = 0u; c < D_COLS; c++) {
                acc[r * MAX_D_COLS + c] *= alpha[r];
            }
        }
        for (var j = 0u; j < tile_kv; j++) {
            var p: array<f32, ROWS>;
            for (var r = 0u; r < ROWS; r++) {
                p[r] = p_tile[(local_id.y + r * WG_Q) * tile_kv + j];
                tile_sum[r] += p[r];
            }
            for (var c = 0u; c < D_COLS; c++) {
                let value = kv_tile[j * d_pad + lane + c * WG_KV];
                for (var r = 0u; r < ROWS; r++) {
                    acc[r * MAX_D_COLS + c] = fma(p[r], value, acc[r * MAX_D_COLS + c]);
                }
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            l[r] = l[r] * alpha[r] + tile_sum[r];
        }
        workgroupBarrier();
    }

    // Normalize and write; a row that saw no key writes 0 and log-sum-exp -inf.
    let all_rows = params.batch * params.heads * params.seq_q;
    for (var r = 0u; r < ROWS; r++) {
        if !row_valid[r] {
            continue;
        }
        let fully_masked = m[r] == neg_inf();
        let inv_sum = select(1.0 / l[r], 0.0, fully_masked);
        let row = row_index[r];
        if params.kv_splits == 1u {
            for (var c = 0u; c < D_COLS; c++) {
                let col = lane + c * WG_KV;
                if col < d {
                    out[row * d + col] = Storage(acc[r * MAX_D_COLS + c] * inv_sum);
                }
            }
            if lane == 0u {
                lse[row] = select(m[r] + log(l[r]), neg_inf(), fully_masked);
            }
        } else {
            let partial_row = split * all_rows + row;
            for (var c = 0u; c < D_COLS; c++) {
                let col = lane + c * WG_KV;
                if col < d {
                    partial_out[partial_row * d + col] = acc[r * MAX_D_COLS + c] * inv_sum;
                }
            }
            if lane == 0u {
                partial_stats[2u * partial_row] = m[r];
                partial_stats[2u * partial_row + 1u] = l[r];
            }
        }
    }
}
