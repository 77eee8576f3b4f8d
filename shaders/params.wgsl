// Parameters shared by every program. The host struct `KernelParams` in
// src/kernels/mod.rs has the same fields in the same order.
//
// Every program that includes this file declares `params` (the uniform block) and `aux` (the
// per-head and per-sequence values below); the functions here read both.
struct Params {
    batch: u32,
    heads: u32,
    kv_heads: u32,
    // The longest sequence of queries and of keys; with packed sequences each may be shorter.
    seq_q: u32,
    seq_kv: u32,
    // Head dim of queries and keys.
    head_dim: u32,
    // 0: none, 1: top-left (key j <= query i), 2: bottom-right (j <= i + seq_kv - seq_q).
    causal: u32,
    has_mask: u32,
    // Element strides of the mask over batch and heads; 0 where the mask broadcasts.
    mask_batch_stride: u32,
    mask_head_stride: u32,
    // Flattened (batch · heads + head) index of the first head this dispatch covers. The score
    // matrix holds only the heads of one chunk, indexed from here.
    bh_offset: u32,
    scale: f32,
    // Added to @builtin(workgroup_id) when a grid larger than the per-dispatch limit is split.
    group_offset: vec3<u32>,
    // Fused kernel only: the most keys per split, sized for the longest sequence, and the number
    // of splits. With more than one split, each writes a partial result that `combine.wgsl`
    // merges. See split_keys for the keys per split of a shorter sequence.
    keys_per_split: u32,
    kv_splits: u32,
    // Logit soft-capping value, or 0 for none.
    softcap: f32,
    // Sliding-window keys before and after the bottom-right diagonal, or -1 for unbounded.
    window_left: i32,
    window_right: i32,
    // Element strides over (batch, head, position) of Q, K, V and the output; the head dim is
    // contiguous. With packed sequences the position is the row in the packed tensor. Each
    // vec3 is followed by a scalar, so the block has no padding.
    q_strides: vec3<u32>,
    // Head dim of values and of the output.
    head_dim_v: u32,
    k_strides: vec3<u32>,
    // Element strides of the log-sum-exp over batch and head; the position is contiguous.
    lse_batch_stride: u32,
    v_strides: vec3<u32>,
    lse_head_stride: u32,
    out_strides: vec3<u32>,
    // Which parts of `aux` are present: EXTRA_* bits.
    extras: u32,
    // Fused kernel only: the fewest keys per split of a sequence, and the multiple of keys
    // (the program's key tile) that a split's size is rounded up to.
    min_keys_per_split: u32,
    split_align: u32,
    // Rows of the packed Q and output, and of the packed K and V; 0 unless the sequences are
    // packed.
    packed_rows: u32,
    packed_keys: u32,
}

// `aux` holds, in this order: ALiBi slopes [heads] and sink logits [heads] as f32 bits, key
// lengths [batch], and the cumulative query and key offsets of packed sequences [batch + 1] each.
const EXTRA_ALIBI: u32 = 1u;
const EXTRA_SINKS: u32 = 2u;
const EXTRA_KV_LENS: u32 = 4u;
const EXTRA_PACKED: u32 = 8u;
// Not a part of `aux`: the key lengths place the diagonals (KeyLengths::Cache).
const EXTRA_LENS_PLACE_DIAGONAL: u32 = 16u;

// Negative infinity, built at run time because WGSL constant expressions may not be infinite.
fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

// A quiet NaN, built the same way.
fn nan() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

// Whether `x` is NaN. The test reads the bits, because WGSL lets compilers assume that floats
// are never NaN and fold a float comparison such as x != x.
fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// Whether a score makes its whole row NaN, as in the reference: NaN, or +inf (whose softmax
// needs exp(inf - inf)). A score of -inf is a masked key.
fn poisons_row(s: f32) -> bool {
    return is_nan(s) || bitcast<u32>(s) == 0x7f800000u;
}

// One batch element's sequence.
struct Sequence {
    // Query rows, and the key count that places the bottom-right diagonal: seq_q and seq_kv, or
    // the packed sequence's own lengths; with EXTRA_LENS_PLACE_DIAGONAL, the key length.
    rows: u32,
    keys: u32,
    // Keys below this index exist and may be attended: `keys`, or the key length when smaller.
    key_limit: u32,
    // The sequence's first row in Q, the output and the log-sum-exp, and first key in K and V;
    // 0 unless the sequences are packed.
    row_begin: u32,
    key_begin: u32,
}

fn sequence(b: u32) -> Sequence {
    var seq = Sequence(params.seq_q, params.seq_kv, params.seq_kv, 0u, 0u);
    if (params.extras & EXTRA_PACKED) != 0u {
        let cu_q = 2u * params.heads + params.batch;
        let cu_kv = cu_q + params.batch + 1u;
        // Offsets the host did not check are clamped: a bad length cannot reach past the
        // dispatched grid, and no sequence reaches past the packed tensors. The programs that
        // go without wgpu's bounds checks rely on the second.
        seq.row_begin = min(aux[cu_q + b], params.packed_rows);
        seq.key_begin = min(aux[cu_kv + b], params.packed_keys);
        let rows = min(aux[cu_q + b + 1u] - aux[cu_q + b], params.seq_q);
        let keys = min(aux[cu_kv + b + 1u] - aux[cu_kv + b], params.seq_kv);
        seq.rows = min(rows, params.packed_rows - seq.row_begin);
        seq.keys = min(keys, params.packed_keys - seq.key_begin);
        seq.key_limit = seq.keys;
    }
    if (params.extras & EXTRA_KV_LENS) != 0u {
        seq.key_limit = min(seq.key_limit, aux[2u * params.heads + b]);
        if (params.extras & EXTRA_LENS_PLACE_DIAGONAL) != 0u {
            seq.keys = seq.key_limit;
        }
    }
    return seq;
}

// The head that a workgroup of the three-stage path works on. Those programs run the heads in
// chunks that start at head params.bh_offset; `chunk_index` counts from there and indexes the
// chunk's scores, and b, h and kv_head place the head in Q, K, V and the output.
struct ChunkHead {
    chunk_index: u32,
    b: u32,
    h: u32,
    kv_head: u32,
}

fn chunk_head(chunk_index: u32) -> ChunkHead {
    let bh = params.bh_offset + chunk_index;
    let h = bh % params.heads;
    return ChunkHead(chunk_index, bh / params.heads, h, h / (params.heads / params.kv_heads));
}

// Element offsets of row `row` (already including row_begin) of head `h` in batch element `b`.
fn q_offset(b: u32, h: u32, row: u32) -> u32 {
    return b * params.q_strides.x + h * params.q_strides.y + row * params.q_strides.z;
}

fn k_offset(b: u32, kv_head: u32, key: u32) -> u32 {
    return b * params.k_strides.x + kv_head * params.k_strides.y + key * params.k_strides.z;
}

fn v_offset(b: u32, kv_head: u32, key: u32) -> u32 {
    return b * params.v_strides.x + kv_head * params.v_strides.y + key * params.v_strides.z;
}

fn out_offset(b: u32, h: u32, row: u32) -> u32 {
    return b * params.out_strides.x + h * params.out_strides.y + row * params.out_strides.z;
}

fn lse_offset(b: u32, h: u32, row: u32) -> u32 {
    return b * params.lse_batch_stride + h * params.lse_head_stride + row;
}

// The bottom-right diagonal of row `i`: key i + keys - rows, negative when rows > keys + i.
fn diagonal(seq: Sequence, i: u32) -> i32 {
    return i32(i) + i32(seq.keys) - i32(seq.rows);
}

// The ALiBi slope of query head `h`, or 0 without ALiBi. Row i and key j get the additive bias
// -slope · |j - diagonal(i)|.
fn alibi_slope(h: u32) -> f32 {
    if (params.extras & EXTRA_ALIBI) == 0u {
        return 0.0;
    }
    return bitcast<f32>(aux[h]);
}

// The ALiBi bias of key `j` for a row with this diagonal and slope.
fn alibi_bias(slope: f32, diag: i32, j: u32) -> f32 {
    return -slope * f32(abs(i32(j) - diag));
}

// The sink logit of query head `h`, or -inf without sinks. It joins each row's softmax
// denominator as a key with no value row.
fn sink_logit(h: u32) -> f32 {
    if (params.extras & EXTRA_SINKS) == 0u {
        return neg_inf();
    }
    return bitcast<f32>(aux[params.heads + h]);
}

// Soft-caps a scaled score: softcap · tanh(s / softcap). The argument is clamped to ±15, where
// tanh is ±1 in f32, because some drivers compute tanh through exp and overflow to NaN beyond.
// WGSL lets tanh be accurate only in absolute terms (lavapipe's error was about 6e-8, which
// softcap = 30 turns into 2e-6 on scores near 0), so below |x| = 0.125 the odd Taylor series
// x - x³/3 + 2x⁵/15 - 17x⁷/315 is used instead; its next term is under 2e-10 relative there.
fn cap_score(s: f32) -> f32 {
    if params.softcap <= 0.0 {
        return s;
    }
    let x = clamp(s / params.softcap, -15.0, 15.0);
    let x2 = x * x;
    let series = x * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))));
    let capped = params.softcap * select(tanh(x), series, abs(x) < 0.125);
    // WGSL leaves clamp of a NaN to the implementation, and llvmpipe returns the lower bound,
    // which would cap a NaN score to -softcap. A NaN score stays NaN, as in the reference, so
    // that its row becomes NaN.
    return select(capped, s, is_nan(s));
}

// The keys row `i` may attend to, as [x, y): those that exist and that the causal mask and the
// sliding window allow. Every constraint bounds one side, so the allowed keys are one range,
// and both ends grow with `i`. The range is empty (x >= y) for a row that sees no key.
fn key_range(seq: Sequence, i: u32) -> vec2<u32> {
    let diag = diagonal(seq, i);
    let limit = i32(seq.key_limit);
    var end = limit;
    switch params.causal {
        case 1u: {
            end = min(end, i32(i) + 1);
        }
        case 2u: {
            end = min(end, diag + 1);
        }
        default: {}
    }
    if params.window_right >= 0 {
        end = min(end, diag + params.window_right + 1);
    }
    var begin = 0;
    if params.window_left >= 0 {
        begin = diag - params.window_left;
    }
    return vec2<u32>(u32(clamp(begin, 0, limit)), u32(clamp(end, 0, limit)));
}

// The first key that row `first_row` (and so any later row) may attend to.
fn window_key_begin(seq: Sequence, first_row: u32) -> u32 {
    return key_range(seq, first_row).x;
}

// One past the last key that any row before `row_end` may attend to. Keys from here on are
// masked for the whole tile and skipped.
fn block_key_end(seq: Sequence, row_end: u32) -> u32 {
    if row_end == 0u {
        return 0u;
    }
    return key_range(seq, row_end - 1u).y;
}

// Keys per split of one sequence: its keys spread over the splits, at least
// params.min_keys_per_split, rounded up to a multiple of params.split_align, and at most
// params.keys_per_split, and never 0. The host sizes the splits for the longest sequence, such as the whole
// capacity of a key/value cache; a sequence with fewer keys uses fewer, shorter splits, so that
// the work follows its own length (see active_splits).
fn split_keys(seq: Sequence) -> u32 {
    let spread = (seq.key_limit + params.kv_splits - 1u) / params.kv_splits;
    let wanted = max(spread, params.min_keys_per_split);
    let aligned = (wanted + params.split_align - 1u) / params.split_align * params.split_align;
    return max(min(aligned, params.keys_per_split), 1u);
}

// The splits that hold some of a sequence's keys, at least 1. The fused programs' workgroups of
// the other splits return at once, and `combine.wgsl` merges only these.
fn active_splits(seq: Sequence) -> u32 {
    let keys = split_keys(seq);
    return max(1u, (seq.key_limit + keys - 1u) / keys);
}

// The keys of split `split` that some row of a fused program's block may attend to, as [x, y):
// the block is packed rows packed0 to packed0 + block_q - 1 of a key/value head that has
// `packed_rows` of them (see flash.wgsl). A block that spans two query heads covers positions
// 0 to seq_q - 1. The range is empty (x >= y) when the block has no valid row.
fn block_keys(seq: Sequence, packed0: u32, block_q: u32, packed_rows: u32, split: u32) -> vec2<u32> {
    let last_packed = min(packed0 + block_q, packed_rows) - 1u;
    var first_position = packed0 % params.seq_q;
    var last_position = last_packed % params.seq_q;
    if last_packed / params.seq_q != packed0 / params.seq_q {
        first_position = 0u;
        last_position = params.seq_q - 1u;
    }
    let split_size = split_keys(seq);
    let split_begin = split * split_size;
    let key_begin = max(split_begin, window_key_begin(seq, first_position));
    var key_end = min(
        block_key_end(seq, min(last_position + 1u, seq.rows)),
        split_begin + split_size,
    );
    if first_position >= seq.rows {
        key_end = key_begin;
    }
    return vec2<u32>(key_begin, key_end);
}

// A query row of a fused program's block. Packed row p of a key/value head is query head
// kv_head · (heads / kv_heads) + p / seq_q at position p % seq_q.
struct PackedRow {
    head: u32,
    position: u32,
    // False past the packed rows or past the sequence's length. Such a row sees no key.
    valid: bool,
    // The keys the row may attend to, as [x, y), empty when the row is not valid.
    keys: vec2<u32>,
    slope: f32,
    diagonal: i32,
    // Element offsets of the row in the mask and in Q.
    mask_row: u32,
    q_base: u32,
}

// Returns how many packed rows one key/value head has: seq_q rows for each of its query heads.
fn packed_rows_per_kv_head() -> u32 {
    return params.heads / params.kv_heads * params.seq_q;
}

// Returns packed row `p` of key/value head `kv_head` in batch element `b`. A row past the packed
// rows, or past its sequence, is not valid, and its offsets stay in bounds so that the programs
// may read its Q row unconditionally.
fn packed_row(b: u32, kv_head: u32, seq: Sequence, p: u32) -> PackedRow {
    let heads_per_kv = params.heads / params.kv_heads;
    let packed_rows = packed_rows_per_kv_head();
    let packed = min(p, packed_rows - 1u);
    let h = kv_head * heads_per_kv + packed / params.seq_q;
    let position = packed % params.seq_q;
    let valid = p < packed_rows && position < seq.rows;
    // A packed sequence shorter than seq_q would place its invalid rows past Q's last row.
    var q_row = seq.row_begin + position;
    if (params.extras & EXTRA_PACKED) != 0u {
        q_row = min(q_row, params.packed_rows - 1u);
    }
    return PackedRow(
        h,
        position,
        valid,
        select(vec2<u32>(0u), key_range(seq, position), valid),
        alibi_slope(h),
        diagonal(seq, position),
        b * params.mask_batch_stride + h * params.mask_head_stride + position * params.seq_kv,
        q_offset(b, h, q_row),
    );
}
