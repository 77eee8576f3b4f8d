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
//   3. each invocation adds P times the V tile to its ROWS × D_COLS_V outputs (columns
//      x, x + WG_KV, ...).
// m, l and the accumulator are f32. Tiles that the causal mask, the window or the key length
// hides from every row of the block are skipped. A row that sees no key keeps m = -inf and
// l = 0, and its output is 0; a sink logit starts the first split at m = sink, l = 1.
//
// Large head dims stage K in chunks of K_CHUNK columns and V in chunks of V_KEYS keys, so one
// staging buffer of KV_TILE floats serves both; with the chunks equal to the whole tile, each
// tile has four barriers.
//
// Where a sequence's keys fill one split (see active_splits), the kernel writes the output and
// log-sum-exp. Where they fill several, each split writes its normalized partial output and its
// (m, l) pair, and `combine.wgsl` merges them.

const ROWS: u32 = 4u;
// Upper bounds of KEYS and D_COLS_V, which size the per-invocation register arrays.
const MAX_KEYS: u32 = 4u;
// MAX_HEAD_DIM / WG_KV = 576 / 16.
const MAX_D_COLS: u32 = 36u;
// Key lanes, which are also the stride of each invocation's keys and output columns.
override WG_KV: u32 = 16u;
// Row lanes; BLOCK_Q = WG_Q · ROWS.
override WG_Q: u32 = 16u;
// Keys per lane per tile, at most MAX_KEYS.
override KEYS: u32 = 4u;
// Columns per lane of the query/key head dim and of the value head dim, ceil(dim / WG_KV); the
// second is at most MAX_D_COLS. Overrides make the loops over KEYS and D_COLS_V
// constant-bounded, so the register arrays need no dynamic indexing.
override D_COLS: u32 = 4u;
override D_COLS_V: u32 = 4u;
// K columns staged per step, dividing WG_KV · D_COLS, and V keys staged per step, dividing
// WG_KV · KEYS.
override K_CHUNK: u32 = 64u;
override V_KEYS: u32 = 64u;
// Floats of the staging buffer: max(TILE_KV · K_CHUNK, V_KEYS · WG_KV · D_COLS_V).
override KV_TILE: u32 = 4096u;

// The bindings come from fused_bindings.wgsl, with K and V elements of the storage type.
alias QElement = Storage;
alias KvElement = Storage;

// The Q block, [BLOCK_Q][WG_KV · D_COLS], zero-padded: WG_Q · ROWS · WG_KV · D_COLS · 4 bytes.
var<workgroup> q_block: array<f32, WG_Q * ROWS * WG_KV * D_COLS>;
// A chunk of the K tile as [K_CHUNK][TILE_KV], or a chunk of the V tile as
// [V_KEYS][WG_KV · D_COLS_V]: KV_TILE · 4 bytes.
var<workgroup> kv_tile: array<f32, KV_TILE>;
// Probabilities of the tile, [BLOCK_Q][TILE_KV]: WG_Q · ROWS · WG_KV · KEYS · 4 bytes.
var<workgroup> p_tile: array<f32, WG_Q * ROWS * WG_KV * KEYS>;
// Each lane's maximum score per row, [BLOCK_Q][WG_KV]: WG_Q · ROWS · WG_KV · 4 bytes.
var<workgroup> lane_max: array<f32, WG_Q * ROWS * WG_KV>;

@compute @workgroup_size(WG_KV, WG_Q, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_id) local_id: vec3<u32>,
    @builtin(local_invocation_index) local_index: u32,
) {
    let block_q = WG_Q * ROWS;
    let tile_kv = WG_KV * KEYS;
    let d_pad = WG_KV * D_COLS;
    let dv_pad = WG_KV * D_COLS_V;
    let invocations = WG_Q * WG_KV;
    let group = workgroup_id + params.group_offset;
    let bkv = group.z;
    let b = bkv / params.kv_heads;
    let kv_head = bkv % params.kv_heads;
    let heads_per_kv = params.heads / params.kv_heads;
    let packed_rows = heads_per_kv * params.seq_q;
    let packed0 = group.x * block_q;
    let split = group.y;
    let d = params.head_dim;
    let dv = params.head_dim_v;
    let lane = local_id.x;
    let seq = sequence(b);
    // The condition is the same for the whole workgroup, so no barrier below is skipped by some
    // invocations only.
    let splits = active_splits(seq);
    if split >= splits {
        return;
    }
    // With one active split, the output and log-sum-exp are written here, not merged.
    let direct = splits == 1u;

    // Load the Q block once, scaled as the other programs scale it, so that the products stay
    // within f32 where the scaled scores do. Zero past the packed rows, the sequence and head_dim.
    for (var t = local_index; t < block_q * d_pad; t += invocations) {
        let packed = packed0 + t / d_pad;
        let col = t % d_pad;
        let h = kv_head * heads_per_kv + packed / params.seq_q;
        let position = packed % params.seq_q;
        var value = 0.0;
        if packed < packed_rows && position < seq.rows && col < d {
            value = f32(q[q_offset(b, h, seq.row_begin + position) + col]) * params.scale;
        }
        q_block[t] = value;
    }

    // This invocation's rows: query head, position and mask row, or valid = false past the end.
    var row_head: array<u32, ROWS>;
    var row_position: array<u32, ROWS>;
    var row_valid: array<bool, ROWS>;
    var mask_row: array<u32, ROWS>;
    // Keys each row may attend to (empty past the end), its ALiBi slope and its diagonal.
    var row_keys: array<vec2<u32>, ROWS>;
    var row_slope: array<f32, ROWS>;
    var row_diag: array<i32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        let unclamped = packed0 + local_id.y + r * WG_Q;
        let packed = min(unclamped, packed_rows - 1u);
        row_head[r] = kv_head * heads_per_kv + packed / params.seq_q;
        row_position[r] = packed % params.seq_q;
        row_valid[r] = unclamped < packed_rows && row_position[r] < seq.rows;
        mask_row[r] = b * params.mask_batch_stride + row_head[r] * params.mask_head_stride
            + row_position[r] * params.seq_kv;
        row_keys[r] = select(vec2<u32>(0u), key_range(seq, row_position[r]), row_valid[r]);
        row_slope[r] = alibi_slope(row_head[r]);
        row_diag[r] = diagonal(seq, row_position[r]);
    }

    // Keys of this split that some row of the block may attend to.
    let keys = block_keys(seq, packed0, block_q, packed_rows, split);
    let key_begin = keys.x;
    let key_end = keys.y;

    // `poisoned` records a NaN or +inf score in the row, which makes the row NaN as in the
    // reference; lanes share it through lane_max, where such a lane writes NaN.
    var m: array<f32, ROWS>;
    var l: array<f32, ROWS>;
    var poisoned: array<bool, ROWS>;
    var acc: array<f32, ROWS * MAX_D_COLS>;
    for (var r = 0u; r < ROWS; r++) {
        m[r] = neg_inf();
        // The sink joins the first split's sum as a score with no value row.
        let sink = sink_logit(row_head[r]);
        if split == 0u && sink != neg_inf() {
            poisoned[r] = poisons_row(sink);
            m[r] = sink;
            l[r] = 1.0;
        }
    }

    for (var j0 = key_begin; j0 < key_end; j0 += tile_kv) {
        // 1. Scores for ROWS rows × KEYS keys, K staged transposed (kv_tile[c][key]) K_CHUNK
        // columns at a time, zero past key_end and head_dim.
        var s: array<f32, ROWS * MAX_KEYS>;
        for (var c0 = 0u; c0 < d_pad; c0 += K_CHUNK) {
            for (var t = local_index; t < tile_kv * K_CHUNK; t += invocations) {
                let key = t / K_CHUNK;
                let c = t % K_CHUNK;
                var value = 0.0;
                if j0 + key < key_end && c0 + c < d {
                    value = f32(k[k_offset(b, kv_head, seq.key_begin + j0 + key) + c0 + c]);
                }
                kv_tile[c * tile_kv + key] = value;
            }
            workgroupBarrier();
            // Each block of 32 columns is summed on its own and then added to the score, which
            // rounds a dot product of d terms about as much as one of 32 + d / 32 terms instead
            // of d. Blocks of 16 were no more accurate than blocks of 32 at head dims 64 to 256.
            for (var c32 = 0u; c32 < K_CHUNK; c32 += 32u) {
                var block: array<f32, ROWS * MAX_KEYS>;
                for (var c = c32; c < min(c32 + 32u, K_CHUNK); c++) {
                    var q_values: array<f32, ROWS>;
                    for (var r = 0u; r < ROWS; r++) {
                        q_values[r] = q_block[(local_id.y + r * WG_Q) * d_pad + c0 + c];
                    }
                    for (var kk = 0u; kk < KEYS; kk++) {
                        let k_value = kv_tile[c * tile_kv + lane + kk * WG_KV];
                        for (var r = 0u; r < ROWS; r++) {
                            let i = r * MAX_KEYS + kk;
                            block[i] = fma(q_values[r], k_value, block[i]);
                        }
                    }
                }
                for (var i = 0u; i < ROWS * MAX_KEYS; i++) {
                    s[i] += block[i];
                }
            }
            if c0 + K_CHUNK >= d_pad {
                // Last chunk: finish the scores and publish each row's maximum over this lane's
                // keys before the barrier.
                for (var r = 0u; r < ROWS; r++) {
                    var row_max = neg_inf();
                    var lane_poisoned = false;
                    for (var kk = 0u; kk < KEYS; kk++) {
                        let key = j0 + lane + kk * WG_KV;
                        var score = cap_score(s[r * MAX_KEYS + kk])
                            + alibi_bias(row_slope[r], row_diag[r], key);
                        if key < row_keys[r].x || key >= min(row_keys[r].y, key_end) {
                            score = neg_inf();
                        } else if params.has_mask != 0u {
                            score += mask[mask_row[r] + key];
                        }
                        s[r * MAX_KEYS + kk] = score;
                        lane_poisoned = lane_poisoned || poisons_row(score);
                        row_max = max(row_max, score);
                    }
                    lane_max[(local_id.y + r * WG_Q) * WG_KV + lane] =
                        select(row_max, nan(), lane_poisoned);
                }
            }
            // Every read of this K chunk ends here, before the next chunk or V is staged.
            workgroupBarrier();
        }

        // 2. Online softmax update. Every lane of a row computes the same maximum and scale.
        // p_tile is read only after the first barrier of step 3.
        var alpha: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            let local_row = local_id.y + r * WG_Q;
            var tile_max = neg_inf();
            for (var x = 0u; x < WG_KV; x++) {
                let lane_value = lane_max[local_row * WG_KV + x];
                if is_nan(lane_value) {
                    poisoned[r] = true;
                } else {
                    tile_max = max(tile_max, lane_value);
                }
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
            l[r] *= alpha[r];
            for (var c = 0u; c < D_COLS_V; c++) {
                acc[r * MAX_D_COLS + c] *= alpha[r];
            }
        }

        // 3. Add P V for this invocation's rows and columns, V staged V_KEYS keys at a time
        // (kv_tile[key][c]), zero past key_end and head_dim_v. The key loop is outermost so
        // each staged V value serves all ROWS rows.
        for (var v0 = 0u; v0 < tile_kv; v0 += V_KEYS) {
            for (var t = local_index; t < V_KEYS * dv_pad; t += invocations) {
                let key = j0 + v0 + t / dv_pad;
                let c = t % dv_pad;
                var value = 0.0;
                if key < key_end && c < dv {
                    value = f32(v[v_offset(b, kv_head, seq.key_begin + key) + c]);
                }
                kv_tile[t] = value;
            }
            workgroupBarrier();
            for (var j = 0u; j < V_KEYS; j++) {
                var p: array<f32, ROWS>;
                for (var r = 0u; r < ROWS; r++) {
                    p[r] = p_tile[(local_id.y + r * WG_Q) * tile_kv + v0 + j];
                    l[r] += p[r];
                }
                // A key of probability 0, such as a masked one, leaves the accumulator as it
                // is, so a NaN or infinity in its value row cannot reach the output.
                for (var c = 0u; c < D_COLS_V; c++) {
                    let value = kv_tile[j * dv_pad + lane + c * WG_KV];
                    for (var r = 0u; r < ROWS; r++) {
                        let old = acc[r * MAX_D_COLS + c];
                        // The ordered test p == 0.0 keeps a NaN p, which must propagate.
                        acc[r * MAX_D_COLS + c] = select(fma(p[r], value, old), old, p[r] == 0.0);
                    }
                }
            }
            workgroupBarrier();
        }
    }

    // Normalize and write; a row that saw no key writes 0 and log-sum-exp -inf.
    let all_rows = params.batch * params.heads * params.seq_q;
    for (var r = 0u; r < ROWS; r++) {
        if !row_valid[r] {
            continue;
        }
        let fully_masked = m[r] == neg_inf();
        let inv_sum = select(1.0 / l[r], 0.0, fully_masked);
        let h = row_head[r];
        let position = row_position[r];
        if poisoned[r] {
            m[r] = nan();
            l[r] = nan();
        }
        if direct {
            let out_base = out_offset(b, h, seq.row_begin + position);
            for (var c = 0u; c < D_COLS_V; c++) {
                let col = lane + c * WG_KV;
                if col < dv {
                    let value = select(acc[r * MAX_D_COLS + c] * inv_sum, nan(), poisoned[r]);
                    out[out_base + col] = Storage(value);
                }
            }
            if lane == 0u {
                lse[lse_offset(b, h, seq.row_begin + position)] =
                    select(select(m[r] + log(l[r]), neg_inf(), fully_masked), nan(), poisoned[r]);
            }
        } else {
            let partial_row = split * all_rows + (b * params.heads + h) * params.seq_q + position;
            for (var c = 0u; c < D_COLS_V; c++) {
                let col = lane + c * WG_KV;
                if col < dv {
                    partial[partial_row * dv + col] = acc[r * MAX_D_COLS + c] * inv_sum;
                }
            }
            if lane == 0u {
                let stats = params.kv_splits * all_rows * dv + 2u * partial_row;
                partial[stats] = m[r];
                partial[stats + 1u] = l[r];
            }
        }
    }
}
