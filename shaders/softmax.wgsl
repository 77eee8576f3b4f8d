// Stage 2 of the three-stage path: row softmax of S, in place, and the row's log-sum-exp.
//
// One workgroup per score row. Each invocation keeps a running maximum and a running sum of
// exp(s - max) over its strided part of the row (an online softmax, so the row is read twice
// rather than three times), the workgroup combines the pairs in a tree, and a second pass writes
// p = exp(s - max) / sum. Everything is f32. A row whose every score is -inf gets probabilities 0
// and log-sum-exp -inf, never NaN. A sink logit joins the sum as one more score with no
// probability of its own, so a row's probabilities then sum to less than 1.

// Invocations per row; a power of two, because the tree reduction halves the active range.
override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> params: Params;
// [heads of this chunk, seq_q, seq_kv]: scores in, probabilities out.
@group(0) @binding(1) var<storage, read_write> scores: array<f32>;
// Natural-log log-sum-exp of each row's scores, addressed through lse_offset.
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;
// Per-head and per-sequence values; see params.wgsl.
@group(0) @binding(3) var<storage, read> aux: array<u32>;

// Partial maxima and sums of the invocations, and whether each saw a score that makes the row
// NaN: 3 · WG · 4 bytes (3 KiB at the default).
var<workgroup> partial_max: array<f32, WG>;
var<workgroup> partial_sum: array<f32, WG>;
var<workgroup> partial_poisoned: array<u32, WG>;

// Merges the running (max, sum) pair (m, l) with the pair (m2, l2) of a disjoint set of scores.
fn merge(m: f32, l: f32, m2: f32, l2: f32) -> vec2<f32> {
    let new_max = max(m, m2);
    if new_max == neg_inf() {
        // Both sides saw only masked scores: exp(-inf - -inf) would be NaN.
        return vec2<f32>(new_max, 0.0);
    }
    return vec2<f32>(new_max, l * exp(m - new_max) + l2 * exp(m2 - new_max));
}

@compute @workgroup_size(WG, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_index) local_index: u32,
) {
    let group = workgroup_id + params.group_offset;
    let row = group.x;
    let head = chunk_head(group.z);
    let row_base = (head.chunk_index * params.seq_q + row) * params.seq_kv;
    let seq = sequence(head.b);
    if row >= seq.rows {
        // A row past a packed sequence's end: its probabilities read as zeros.
        for (var j = local_index; j < params.seq_kv; j += WG) {
            scores[row_base + j] = 0.0;
        }
        return;
    }

    // Pass 1: running max and sum over this invocation's keys, the first invocation starting
    // from the sink. Masked (-inf) scores add nothing.
    var m = neg_inf();
    var l = 0.0;
    var poisoned = 0u;
    let sink = sink_logit(head.h);
    if local_index == 0u && sink != neg_inf() {
        m = sink;
        l = 1.0;
        poisoned = u32(poisons_row(sink));
    }
    for (var j = local_index; j < params.seq_kv; j += WG) {
        let s = scores[row_base + j];
        if poisons_row(s) {
            poisoned = 1u;
        }
        if s == neg_inf() {
            continue;
        }
        if s > m {
            l = l * exp(m - s) + 1.0;
            m = s;
        } else {
            // Also taken for NaN, which then makes the sum, and the row, NaN.
            l += exp(s - m);
        }
    }
    partial_max[local_index] = m;
    partial_sum[local_index] = l;
    partial_poisoned[local_index] = poisoned;
    workgroupBarrier();

    // Tree reduction of the (max, sum) pairs.
    for (var width = WG / 2u; width > 0u; width /= 2u) {
        if local_index < width {
            let merged = merge(
                partial_max[local_index],
                partial_sum[local_index],
                partial_max[local_index + width],
                partial_sum[local_index + width],
            );
            partial_max[local_index] = merged.x;
            partial_sum[local_index] = merged.y;
            partial_poisoned[local_index] |= partial_poisoned[local_index + width];
        }
        workgroupBarrier();
    }
    let row_max = partial_max[0];
    let row_sum = partial_sum[0];
    let fully_masked = row_max == neg_inf();
    let row_poisoned = partial_poisoned[0] != 0u;

    // Pass 2: probabilities, 0 for every key of a fully masked row and NaN for every key of a
    // poisoned one.
    let inv_sum = select(1.0 / row_sum, 0.0, fully_masked);
    let safe_max = select(row_max, 0.0, fully_masked);
    for (var j = local_index; j < params.seq_kv; j += WG) {
        let s = scores[row_base + j];
        scores[row_base + j] = select(exp(s - safe_max) * inv_sum, nan(), row_poisoned);
    }
    if local_index == 0u {
        lse[lse_offset(head.b, head.h, seq.row_begin + row)] =
            select(row_max + log(row_sum), nan(), row_poisoned);
    }
}
