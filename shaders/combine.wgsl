// Merges the fused kernel's partial results over disjoint key ranges into the output and the
// log-sum-exp.
//
// Split s covered its keys with running maximum m_s and sum l_s and wrote its output o_s
// normalized by l_s. With M = max_s m_s and w_s = l_s · exp(m_s - M), the full output is
// Σ_s w_s · o_s / Σ_s w_s and the log-sum-exp is M + ln Σ_s w_s. A split that saw no key has
// m_s = -inf and l_s = 0, so it weighs nothing; a row no split saw gets output 0 and -inf.

// Invocations per row, striding over head_dim.
override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> params: Params;
// The splits' outputs, [kv_splits, batch, heads, seq_q, head_dim_v], then their (m, l) pairs,
// [kv_splits, batch, heads, seq_q, 2].
@group(0) @binding(1) var<storage, read> partial: array<f32>;
// The output and log-sum-exp, addressed through out_offset and lse_offset.
@group(0) @binding(2) var<storage, read_write> out: array<Storage>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
// Per-head and per-sequence values; see params.wgsl.
@group(0) @binding(4) var<storage, read> aux: array<u32>;

@compute @workgroup_size(WG, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_index) local_index: u32,
) {
    let group = workgroup_id + params.group_offset;
    let position = group.x;
    let b = group.z / params.heads;
    let h = group.z % params.heads;
    let seq = sequence(b);
    if position >= seq.rows {
        return;
    }
    let row = group.z * params.seq_q + position;
    let all_rows = params.batch * params.heads * params.seq_q;
    let d = params.head_dim_v;
    let stats_base = params.kv_splits * all_rows * d;
    let out_base = out_offset(b, h, seq.row_begin + position);
    let lse_index = lse_offset(b, h, seq.row_begin + position);

    // Only the sequence's active splits ran; the partial results of the others are stale. A
    // split that saw a NaN or +inf score wrote m = NaN, which makes the row NaN.
    let splits = active_splits(seq);
    if splits == 1u {
        // The fused program wrote this row's output and log-sum-exp itself.
        return;
    }
    var max_all = neg_inf();
    var poisoned = false;
    for (var s = 0u; s < splits; s++) {
        let m = partial[stats_base + 2u * (s * all_rows + row)];
        poisoned = poisoned || is_nan(m);
        max_all = max(max_all, m);
    }
    if poisoned {
        for (var col = local_index; col < d; col += WG) {
            out[out_base + col] = Storage(nan());
        }
        if local_index == 0u {
            lse[lse_index] = nan();
        }
        return;
    }
    if max_all == neg_inf() {
        for (var col = local_index; col < d; col += WG) {
            out[out_base + col] = Storage(0.0);
        }
        if local_index == 0u {
            lse[lse_index] = neg_inf();
        }
        return;
    }

    var total = 0.0;
    for (var s = 0u; s < splits; s++) {
        let stats = stats_base + 2u * (s * all_rows + row);
        total += partial[stats + 1u] * exp(partial[stats] - max_all);
    }
    for (var col = local_index; col < d; col += WG) {
        var sum = 0.0;
        for (var s = 0u; s < splits; s++) {
            let stats = stats_base + 2u * (s * all_rows + row);
            let weight = partial[stats + 1u] * exp(partial[stats] - max_all);
            sum += weight * partial[(s * all_rows + row) * d + col];
        }
        out[out_base + col] = Storage(sum / total);
    }
    if local_index == 0u {
        lse[lse_index] = max_all + log(total);
    }
}
