// The bindings of the fused programs (`flash.wgsl`, `flash_rows.wgsl`, `flash_decode.wgsl` and
// `flash_subgroup.wgsl`), which come after this file, and the query reads and output stores of
// the last three.
// `QElement` and `KvElement`, the element types of Q and of K and V, and `load_q` come from the
// row-load files ahead of a row program: `load_q_vec4.wgsl` brings Q's for all but the scalar
// one. `flash.wgsl` declares its own element types and reads Q without load_q.

@group(0) @binding(0) var<uniform> params: Params;
// Queries, keys and values, addressed through q_offset, k_offset and v_offset.
@group(0) @binding(1) var<storage, read> q: array<QElement>;
@group(0) @binding(2) var<storage, read> k: array<KvElement>;
@group(0) @binding(3) var<storage, read> v: array<KvElement>;
// [mask_batch, mask_heads, seq_q, seq_kv]; one unused element when has_mask is 0.
@group(0) @binding(4) var<storage, read> mask: array<f32>;
// The output and log-sum-exp, addressed through out_offset and lse_offset; written here when
// the row's sequence has one active split (see active_splits).
@group(0) @binding(5) var<storage, read_write> out: array<Storage>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;
// With several active splits: each split's output normalized by its own sum,
// [kv_splits, batch, heads, seq_q, head_dim_v], then its running maximum and sum,
// [kv_splits, batch, heads, seq_q, 2].
@group(0) @binding(7) var<storage, read_write> partial: array<f32>;
// Per-head and per-sequence values; see params.wgsl.
@group(0) @binding(8) var<storage, read> aux: array<u32>;

// Where a finished row's results go: its output row and log-sum-exp, used when `direct`
// (its sequence has one active split), else its partial output row and statistics (maximum,
// then sum) in one split.
struct RowStores {
    direct: bool,
    out_base: u32,
    lse_index: u32,
    partial_base: u32,
    stats_index: u32,
}

// Returns where `row`'s results go, worked out once per row. Recomputed in every store, the
// offsets lengthened the 4-row decoding program's unrolled stores until a call on lavapipe took
// 88 to 93 ms instead of 5.3 ms, and 13.9 s with Mesa's shader cache off, so lavapipe compiled
// the program again at every dispatch.
fn row_stores(b: u32, seq: Sequence, row: PackedRow, split: u32) -> RowStores {
    let all_rows = params.batch * params.heads * params.seq_q;
    let head_row = (b * params.heads + row.head) * params.seq_q + row.position;
    let partial_row = split * all_rows + head_row;
    return RowStores(
        active_splits(seq) == 1u,
        out_offset(b, row.head, seq.row_begin + row.position),
        lse_offset(b, row.head, seq.row_begin + row.position),
        partial_row * params.head_dim_v,
        params.kv_splits * all_rows * params.head_dim_v + 2u * partial_row,
    );
}

// Stores column `col` of a finished row's output, already divided by the row's sum: in the
// output when the row's keys are not split, else in the split's partial output. A poisoned
// row's output is NaN. A split's partial output stays as computed, and its statistics carry the
// NaN.
fn store_output(stores: RowStores, col: u32, value: f32, poisoned: bool) {
    if stores.direct {
        out[stores.out_base + col] = Storage(select(value, nan(), poisoned));
    } else {
        partial[stores.partial_base + col] = value;
    }
}

// Stores a finished row's log-sum-exp, from its running maximum `m` and sum `l`, when the row's
// keys are not split, else `m` and `l` in the split's statistics. A poisoned row stores NaN,
// and a row that saw no key a log-sum-exp of -inf.
fn store_row_stats(stores: RowStores, m: f32, l: f32, poisoned: bool) {
    if stores.direct {
        let lse_value = select(m + log(l), neg_inf(), m == neg_inf());
        lse[stores.lse_index] = select(lse_value, nan(), poisoned);
    } else {
        partial[stores.stats_index] = select(m, nan(), poisoned);
        partial[stores.stats_index + 1u] = select(l, nan(), poisoned);
    }
}
