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
// [kv_splits, batch, heads, seq_q, head_dim]
@group(0) @binding(1) var<storage, read> partial_out: array<f32>;
// [kv_splits, batch, heads, seq_q, 2]: (m, l) per split and row.
@group(0) @binding(2) var<storage, read> partial_stats: array<f32>;
// [batch, heads, seq_q, head_dim]
@group(0) @binding(3) var<storage, read_write> out: array<Storage>;
// [batch, heads, seq_q]
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;

@compute @workgroup_size(WG, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_index) local_index: u32,
) {
    let group = workgroup_id + params.group_offset;
    let row = group.z * params.seq_q + group.x;
    let all_rows = params.batch * params.heads * params.seq_q;
    let d = params.head_dim;

    var max_all = neg_inf();
    for (var s = 0u; s < params.kv_splits; s++) {
        max_all = max(max_all, partial_stats[2u * (s * all_rows + row)]);
    }
    if max_all == neg_inf() {
        for (var col = local_index; col < d; col += WG) {
            out[row * d + col] = Storage(0.0);
        }
        if local_index == 0u {
            lse[row] = neg_inf();
        }
        return;
    }

    var total = 0.0;
    for (var s = 0u; s < params.kv_splits; s++) {
        let stats = 2u * (s * all_rows + row);
        total += partial_stats[stats + 1u] * exp(partial_stats[stats] - max_all);
    }
    for (var col = local_index; col < d; col += WG) {
        var sum = 0.0;
        for (var s = 0u; s < params.kv_splits; s++) {
            let stats = 2u * (s * all_rows + row);
            let weight = partial_stats[stats + 1u] * exp(partial_stats[stats] - max_all);
            sum += weight * partial_out[(s * all_rows + row) * d + col];
        }
        out[row * d + col] = Storage(sum / total);
    }
    if local_index == 0u {
        lse[row] = max_all + log(total);
    }
}
