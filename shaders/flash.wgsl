// Fused attention: scores, online softmax and P V in one pass, never storing the score matrix.
//
// Each workgroup owns BLOCK_Q = WG_Q · ROWS query rows of one (batch, head) and keeps them in
// workgroup memory. Keys and values stream through in tiles of WG_KV keys. For each tile:
//   1. every invocation (x = key lane, y = row lane) computes the scores of its key for its ROWS
//      rows from the resident Q block and the staged K tile;
//   2. the row maximum over the tile updates the running maximum m; the running sum l and the
//      output accumulator are rescaled by exp(m_old - m_new), and each lane writes
//      p = exp(s - m_new) for its key;
//   3. each invocation adds P times the staged V tile to its ROWS × D_COLS outputs (columns
//      x, x + WG_KV, ...).
// m, l and the accumulator are f32. Tiles that the causal mask hides from every row of the block
// are skipped. A row that sees no key keeps m = -inf and l = 0, and its output is 0.

const ROWS: u32 = 4u;
// Upper bound of D_COLS, the output columns per invocation: MAX_HEAD_DIM / WG_KV = 256 / 16.
const MAX_D_COLS: u32 = 16u;
// Key lanes per workgroup, which is also the keys per tile and the output column stride.
override WG_KV: u32 = 16u;
// Row lanes per workgroup; BLOCK_Q = WG_Q · ROWS.
override WG_Q: u32 = 16u;
// Head-dim columns each invocation accumulates: ceil(head_dim / WG_KV). An override, so loops
// over it have a constant bound and the accumulator can stay in registers.
override D_COLS: u32 = 4u;

@group(0) @binding(0) var<uniform> params: Params;
// [batch, heads, seq_q, head_dim]
@group(0) @binding(1) var<storage, read> q: array<f32>;
// [batch, kv_heads, seq_kv, head_dim]
@group(0) @binding(2) var<storage, read> k: array<f32>;
// [batch, kv_heads, seq_kv, head_dim]
@group(0) @binding(3) var<storage, read> v: array<f32>;
// [mask_batch, mask_heads, seq_q, seq_kv]; one unused element when has_mask is 0.
@group(0) @binding(4) var<storage, read> mask: array<f32>;
// [batch, heads, seq_q, head_dim]
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
// [batch, heads, seq_q]
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

// The Q block, [BLOCK_Q][WG_KV · D_COLS], zero-padded: WG_Q · ROWS · WG_KV · D_COLS · 4 bytes.
var<workgroup> q_block: array<f32, WG_Q * ROWS * WG_KV * D_COLS>;
// One K tile, then the V tile of the same keys, [WG_KV][WG_KV · D_COLS]: WG_KV² · D_COLS · 4 bytes.
var<workgroup> kv_tile: array<f32, WG_KV * WG_KV * D_COLS>;
// Scores and probabilities of the tile, [BLOCK_Q][WG_KV] each.
var<workgroup> s_tile: array<f32, WG_Q * ROWS * WG_KV>;
var<workgroup> p_tile: array<f32, WG_Q * ROWS * WG_KV>;

@compute @workgroup_size(WG_KV, WG_Q, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_id) local_id: vec3<u32>,
    @builtin(local_invocation_index) local_index: u32,
) {
    let block_q = WG_Q * ROWS;
    let d_pad = WG_KV * D_COLS;
    let invocations = WG_Q * WG_KV;
    let group = workgroup_id + params.group_offset;
    let bh = group.z;
    let b = bh / params.heads;
    let h = bh % params.heads;
    let kv_head = h / (params.heads / params.kv_heads);
    let d = params.head_dim;
    let q_base = bh * params.seq_q * d;
    let kv_base = (b * params.kv_heads + kv_head) * params.seq_kv * d;
    let mask_base = b * params.mask_batch_stride + h * params.mask_head_stride;
    let row0 = group.x * block_q;
    let lane = local_id.x;

    // Load the Q block once, zero past seq_q and head_dim.
    for (var t = local_index; t < block_q * d_pad; t += invocations) {
        let row = row0 + t / d_pad;
        let col = t % d_pad;
        var value = 0.0;
        if row < params.seq_q && col < d {
            value = q[q_base + row * d + col];
        }
        q_block[t] = value;
    }

    var m: array<f32, ROWS>;
    var l: array<f32, ROWS>;
    var acc: array<f32, ROWS * MAX_D_COLS>;
    for (var r = 0u; r < ROWS; r++) {
        m[r] = neg_inf();
    }

    let key_end = causal_key_end(params, min(row0 + block_q, params.seq_q));
    for (var j0 = 0u; j0 < key_end; j0 += WG_KV) {
        // Stage the K tile, zero past seq_kv and head_dim.
        for (var t = local_index; t < WG_KV * d_pad; t += invocations) {
            let key = j0 + t / d_pad;
            let col = t % d_pad;
            var value = 0.0;
            if key < params.seq_kv && col < d {
                value = k[kv_base + key * d + col];
            }
            kv_tile[t] = value;
        }
        workgroupBarrier();

        // 1. Scores of this lane's key for this invocation's rows.
        let key = j0 + lane;
        for (var r = 0u; r < ROWS; r++) {
            let local_row = local_id.y + r * WG_Q;
            let row = row0 + local_row;
            var dot = 0.0;
            for (var c = 0u; c < d_pad; c++) {
                dot = fma(q_block[local_row * d_pad + c], kv_tile[lane * d_pad + c], dot);
            }
            var s = params.scale * dot;
            if key >= params.seq_kv || row >= params.seq_q || !causal_allows(params, row, key) {
                s = neg_inf();
            } else if params.has_mask != 0u {
                s += mask[mask_base + row * params.seq_kv + key];
            }
            s_tile[local_row * WG_KV + lane] = s;
        }
        workgroupBarrier();

        // Stage the V tile into the same memory; every read of K finished at the barrier above.
        for (var t = local_index; t < WG_KV * d_pad; t += invocations) {
            let key = j0 + t / d_pad;
            let col = t % d_pad;
            var value = 0.0;
            if key < params.seq_kv && col < d {
                value = v[kv_base + key * d + col];
            }
            kv_tile[t] = value;
        }

        // 2. Online softmax update. Every lane of a row computes the same maximum and scale.
        var alpha: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            let local_row = local_id.y + r * WG_Q;
            var tile_max = neg_inf();
            for (var j = 0u; j < WG_KV; j++) {
                tile_max = max(tile_max, s_tile[local_row * WG_KV + j]);
            }
            let new_max = max(m[r], tile_max);
            if new_max == neg_inf() {
                // Nothing seen yet: no rescaling, and exp(-inf - -inf) would be NaN.
                alpha[r] = 1.0;
                p_tile[local_row * WG_KV + lane] = 0.0;
            } else {
                alpha[r] = exp(m[r] - new_max);
                p_tile[local_row * WG_KV + lane] = exp(s_tile[local_row * WG_KV + lane] - new_max);
            }
            m[r] = new_max;
        }
        workgroupBarrier();

        // 3. Rescale, then add P V for this invocation's rows and columns.
        for (var r = 0u; r < ROWS; r++) {
            let local_row = local_id.y + r * WG_Q;
            var tile_sum = 0.0;
            for (var c = 0u; c < D_COLS; c++) {
                acc[r * MAX_D_COLS + c] *= alpha[r];
            }
            for (var j = 0u; j < WG_KV; j++) {
                let p = p_tile[local_row * WG_KV + j];
                tile_sum += p;
                for (var c = 0u; c < D_COLS; c++) {
                    let value = kv_tile[j * d_pad + lane + c * WG_KV];
                    acc[r * MAX_D_COLS + c] = fma(p, value, acc[r * MAX_D_COLS + c]);
                }
            }
            l[r] = l[r] * alpha[r] + tile_sum;
        }
        workgroupBarrier();
    }

    // Normalize and write; a row that saw no key writes 0 and log-sum-exp -inf.
    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + local_id.y + r * WG_Q;
        if row >= params.seq_q {
            continue;
        }
        let fully_masked = m[r] == neg_inf();
        let inv_sum = select(1.0 / l[r], 0.0, fully_masked);
        for (var c = 0u; c < D_COLS; c++) {
            let col = lane + c * WG_KV;
            if col < d {
                out[(bh * params.seq_q + row) * d + col] = acc[r * MAX_D_COLS + c] * inv_sum;
            }
        }
        if lane == 0u {
            lse[bh * params.seq_q + row] = select(m[r] + log(l[r]), neg_inf(), fully_masked);
        }
    }
}
