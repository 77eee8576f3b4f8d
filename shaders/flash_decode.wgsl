// Fused attention for a few query rows per key/value head, as in decoding, for CPU adapters.
//
// Same semantics, splits and outputs as `flash_rows.wgsl`, with the roles turned: a workgroup
// owns one packed row (one query head of a key/value head at one position), and its WG
// invocations take turns over the keys, invocation x taking keys x, x + WG, and so on. Each
// invocation reads its key and value rows straight from memory and keeps its own online softmax
// state. At the end the invocations merge their states through workgroup memory, as
// `combine.wgsl` merges splits, each merging some of the row's vec4 columns. On a CPU driver that
// runs invocations as SIMD lanes, every lane then works on a key of its own, where
// `flash_rows.wgsl` would leave all lanes but one idle.
//
// On llvmpipe, blocks of several rows per workgroup compiled for about 10 s against about 2 s
// for one row, so each row has its own workgroup and re-reads the keys of its key/value head.

// Upper bound of the private arrays: 128 / 4 vec4 columns.
const MAX_D4: u32 = 32u;
// Upper bound of WG, which sizes the merge weights.
const MAX_WG: u32 = 64u;
// Invocations per workgroup, each taking every WG-th key.
override WG: u32 = 8u;
// vec4 columns of the query/key head dim and of the value head dim, at most MAX_D4 each.
override D4: u32 = 16u;
override D4V: u32 = 16u;

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

// Each invocation's (m, l), whether it saw a score that makes the row NaN, and its output
// accumulator: WG · (12 + 16 · D4V) bytes.
var<workgroup> lane_stats: array<vec2<f32>, WG>;
var<workgroup> lane_poisoned: array<u32, WG>;
var<workgroup> lane_acc: array<vec4<f32>, WG * D4V>;

@compute @workgroup_size(WG, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let group = workgroup_id + params.group_offset;
    let bkv = group.z;
    let b = bkv / params.kv_heads;
    let kv_head = bkv % params.kv_heads;
    let heads_per_kv = params.heads / params.kv_heads;
    let packed_rows = heads_per_kv * params.seq_q;
    let split = group.y;
    let seq = sequence(b);

    // Packed row p is query head kv_head · group + p / seq_q at position p % seq_q.
    let packed = group.x;
    let h = kv_head * heads_per_kv + packed / params.seq_q;
    let position = packed % params.seq_q;
    if packed >= packed_rows || position >= seq.rows {
        return;
    }

    // The query row, scaled once here instead of every score.
    let q_base = q_offset(b, h, seq.row_begin + position);
    var q_row: array<vec4<f32>, MAX_D4>;
    for (var c4 = 0u; c4 < D4; c4++) {
        var value = vec4<f32>(0.0);
        for (var e = 0u; e < 4u; e++) {
            let col = 4u * c4 + e;
            if col < params.head_dim {
                value[e] = params.scale * f32(q[q_base + col]);
            }
        }
        q_row[c4] = value;
    }
    let row_keys = key_range(seq, position);
    let slope = alibi_slope(h);
    let diag = diagonal(seq, position);
    let mask_row = b * params.mask_batch_stride + h * params.mask_head_stride
        + position * params.seq_kv;

    // The sink joins the sum once: in the first split, through the first invocation.
    var m = neg_inf();
    var l = 0.0;
    var poisoned = false;
    let sink = sink_logit(h);
    if split == 0u && lane == 0u && sink != neg_inf() {
        m = sink;
        l = 1.0;
        poisoned = poisons_row(sink);
    }

    // One key per invocation per step, within this split and the row's keys. The loop has no
    // barrier, so invocations may run it a different number of times.
    let split_begin = split * params.keys_per_split;
    let key_begin = max(split_begin, row_keys.x);
    let key_end = min(row_keys.y, split_begin + params.keys_per_split);
    var acc: array<vec4<f32>, MAX_D4>;
    for (var key = key_begin + lane; key < key_end; key += WG) {
        let k_base = k_offset(b, kv_head, seq.key_begin + key);
        let v_base = v_offset(b, kv_head, seq.key_begin + key);
        var dot4 = vec4<f32>(0.0);
        for (var c4 = 0u; c4 < D4; c4++) {
            dot4 = fma(q_row[c4], load_k(k_base, c4), dot4);
        }
        var score = cap_score(dot4.x + dot4.y + dot4.z + dot4.w) + alibi_bias(slope, diag, key);
        if params.has_mask != 0u {
            score += mask[mask_row + key];
        }
        poisoned = poisoned || poisons_row(score);

        // Online softmax update with this one key. A key of probability 0 leaves the
        // accumulator as it is, so a NaN or infinity in its value row cannot reach the output;
        // the ordered test p == 0.0 keeps a NaN p, which must propagate.
        let new_max = max(m, score);
        let seen = new_max != neg_inf();
        let alpha = select(1.0, exp(m - new_max), seen);
        let p = select(0.0, exp(score - new_max), seen);
        l = l * alpha + p;
        for (var c4 = 0u; c4 < D4V; c4++) {
            let scaled = acc[c4] * alpha;
            acc[c4] = select(fma(vec4<f32>(p), load_v(v_base, c4), scaled), scaled, p == 0.0);
        }
        m = new_max;
    }

    // Publish each invocation's state, then merge the row over the invocations, which share its
    // vec4 columns.
    lane_stats[lane] = vec2<f32>(m, l);
    lane_poisoned[lane] = u32(poisoned);
    for (var c4 = 0u; c4 < D4V; c4++) {
        lane_acc[lane * D4V + c4] = acc[c4];
    }
    workgroupBarrier();

    var row_max = neg_inf();
    var row_poisoned = false;
    for (var x = 0u; x < WG; x++) {
        row_max = max(row_max, lane_stats[x].x);
        row_poisoned = row_poisoned || lane_poisoned[x] != 0u;
    }
    let fully_masked = row_max == neg_inf();
    // An invocation that saw no key has m = -inf and weighs nothing.
    var weights: array<f32, MAX_WG>;
    var row_sum = 0.0;
    for (var x = 0u; x < WG; x++) {
        let stats = lane_stats[x];
        weights[x] = select(0.0, exp(stats.x - row_max), stats.x != neg_inf() && !fully_masked);
        row_sum += stats.y * weights[x];
    }
    let inv_sum = select(1.0 / row_sum, 0.0, fully_masked);
    let all_rows = params.batch * params.heads * params.seq_q;
    let dv = params.head_dim_v;
    let split_out = params.kv_splits > 1u;
    let out_base = out_offset(b, h, seq.row_begin + position);
    let partial_row = split * all_rows + (b * params.heads + h) * params.seq_q + position;
    for (var c4 = lane; c4 < D4V; c4 += WG) {
        var merged = vec4<f32>(0.0);
        for (var x = 0u; x < WG; x++) {
            merged += lane_acc[x * D4V + c4] * weights[x];
        }
        merged *= inv_sum;
        for (var e = 0u; e < 4u; e++) {
            let col = 4u * c4 + e;
            if col >= dv {
                break;
            }
            if split_out {
                partial[partial_row * dv + col] = merged[e];
            } else {
                out[out_base + col] = Storage(select(merged[e], nan(), row_poisoned));
            }
        }
    }
    if lane == 0u {
        var row_m = row_max;
        var row_l = row_sum;
        if row_poisoned {
            row_m = nan();
            row_l = nan();
        }
        if split_out {
            let stats = params.kv_splits * all_rows * dv + 2u * partial_row;
            partial[stats] = row_m;
            partial[stats + 1u] = row_l;
        } else {
            lse[lse_offset(b, h, seq.row_begin + position)] =
                select(select(row_m + log(row_l), neg_inf(), fully_masked), nan(), row_poisoned);
        }
    }
}
