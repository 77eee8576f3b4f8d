// Fused attention for a few query rows per key/value head, as in decoding, for CPU adapters.
//
// Same semantics, splits and outputs as `flash_rows.wgsl`, with the roles turned: a workgroup
// owns a block of ROWS packed rows (query heads of one key/value head, at some positions), and
// its WG invocations divide the keys into WG runs of consecutive keys, one run each.
// Each invocation reads its key and value rows straight from memory, uses each for every row of
// the block, and keeps its own online softmax state per row. At the end the invocations merge
// their states through workgroup memory, as `combine.wgsl` merges splits, one row at a time. On
// a CPU driver that runs invocations as SIMD lanes, every lane then works on a key of its own,
// where `flash_rows.wgsl` would leave all lanes but one idle.
//
// On llvmpipe each read from memory is a loop over the SIMD lanes, so reads cost more than the
// arithmetic, and the rows of a block share them. When a key/value head has at most 4 packed
// rows, as in grouped-query decoding with up to 4 query heads per key/value head, the block
// holds them all and reads each key and value row once.
//
// Runs of consecutive keys read faster than keys dealt out in turn (x, x + WG, and so on), where
// each read touches WG rows side by side. With `wgpu-attention bench` on lavapipe (Mesa 22.3, a
// 2-core Xeon), decoding B1 H32 H_kv32 over 4,096 keys at head dim 128 took 11.8 to 12.0 ms with
// runs, against 15.0 to 15.8 ms with keys in turn.

// The host declares these constants ahead of this file, as `const` rather than `override`:
// - WG: invocations per workgroup, each taking one run of consecutive keys;
// - ROWS: packed rows per workgroup; every invocation works on all of them, so each key and
//   value row read from memory serves ROWS rows;
// - D4 and D4V: vec4 columns of the query/key head dim and of the value head dim;
// - SOFTCAP, ALIBI and MASK: 1 where the problem has soft-capping, ALiBi or a mask, else 0.
//   llvmpipe runs both sides of every branch and keeps one result, so a feature tested only at
//   run time would cost every score; a constant removes its code.
// The private arrays are then sized exactly by them, and every loop that indexes one runs over
// its whole length with the loop counter as the index. Mesa's NIR unrolls such loops (here of
// at most 32 iterations), which turns the arrays into registers on llvmpipe. A loop left rolled
// would index them through memory, one load per SIMD lane.

// The bindings and load_q come from fused_bindings.wgsl.

// Each invocation's state for each row of the block, for the merge: its (m, l), whether it saw
// a score that makes the row NaN, and its output accumulator, at slot row · WG + invocation:
// ROWS · WG · (12 + 16 · D4V) bytes.
var<workgroup> lane_stats: array<vec2<f32>, ROWS * WG>;
var<workgroup> lane_poisoned: array<u32, ROWS * WG>;
var<workgroup> lane_acc: array<vec4<f32>, ROWS * WG * D4V>;

@compute @workgroup_size(WG, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let group = workgroup_id + params.group_offset;
    let bkv = group.z;
    let b = bkv / params.kv_heads;
    let kv_head = bkv % params.kv_heads;
    let packed0 = group.x * ROWS;
    let split = group.y;
    let seq = sequence(b);
    // The condition is the same for the whole workgroup, so no barrier below is skipped by some
    // invocations only.
    if split >= active_splits(seq) {
        return;
    }

    // The block's rows, their scaled query rows, and the block's keys: the union of its rows'.
    var rows: array<PackedRow, ROWS>;
    var q_rows: array<array<vec4<f32>, D4>, ROWS>;
    var block_keys = vec2<u32>(params.seq_kv, 0u);
    for (var r = 0u; r < ROWS; r++) {
        rows[r] = packed_row(b, kv_head, seq, packed0 + r);
        let keys = rows[r].keys;
        if keys.x < keys.y {
            block_keys = vec2<u32>(min(block_keys.x, keys.x), max(block_keys.y, keys.y));
        }
        for (var c4 = 0u; c4 < D4; c4++) {
            q_rows[r][c4] = load_q(rows[r].q_base, c4);
        }
    }

    // The sink joins each row's sum once: in the first split, through the first invocation.
    // `poisoned` records a NaN or +inf score, which makes the row NaN as in the reference.
    var m: array<f32, ROWS>;
    var l: array<f32, ROWS>;
    var poisoned: array<bool, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        m[r] = neg_inf();
        l[r] = 0.0;
        poisoned[r] = false;
        let sink = sink_logit(rows[r].head);
        if split == 0u && lane == 0u && sink != neg_inf() {
            m[r] = sink;
            l[r] = 1.0;
            poisoned[r] = poisons_row(sink);
        }
    }

    // Each invocation takes its own run of consecutive keys, within this split and the block's
    // keys. The loop has no barrier, so invocations may run it a different number of times.
    let split_size = split_keys(seq);
    let split_begin = split * split_size;
    let key_begin = max(split_begin, block_keys.x);
    let key_end = min(block_keys.y, split_begin + split_size);
    let lane_keys = (select(0u, key_end - key_begin, key_end > key_begin) + WG - 1u) / WG;
    let lane_begin = key_begin + lane * lane_keys;
    let lane_end = min(lane_begin + lane_keys, key_end);
    var acc: array<array<vec4<f32>, D4V>, ROWS>;
    for (var key = lane_begin; key < lane_end; key++) {
        let k_base = k_offset(b, kv_head, seq.key_begin + key);
        let v_base = v_offset(b, kv_head, seq.key_begin + key);
        var dots: array<vec4<f32>, ROWS>;
        // K and V columns come READ_COLS at a time from read_k and read_v; once NIR unrolls
        // these loops, each read and its test on c4 are constant.
        var k_read: array<vec4<f32>, READ_COLS>;
        for (var c4 = 0u; c4 < D4; c4++) {
            if c4 % READ_COLS == 0u {
                k_read = read_k(k_base, c4 / READ_COLS);
            }
            let k4 = k_read[c4 % READ_COLS];
            for (var r = 0u; r < ROWS; r++) {
                dots[r] = fma(q_rows[r][c4], k4, dots[r]);
            }
        }

        // Online softmax update with this one key. A key of probability 0, such as one outside
        // the row's range, leaves the accumulator as it is, so a NaN or infinity in its value
        // row cannot reach the output; the ordered test p == 0.0 keeps a NaN p, which must
        // propagate.
        var alphas: array<f32, ROWS>;
        var ps: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            let dot4 = dots[r];
            var score = dot4.x + dot4.y + dot4.z + dot4.w;
            if SOFTCAP != 0u {
                score = cap_score(score);
            }
            if ALIBI != 0u {
                score += alibi_bias(rows[r].slope, rows[r].diagonal, key);
            }
            if MASK != 0u {
                score += mask[rows[r].mask_row + key];
            }
            score = select(neg_inf(), score, key >= rows[r].keys.x && key < rows[r].keys.y);
            poisoned[r] = poisoned[r] || poisons_row(score);
            let new_max = max(m[r], score);
            let seen = new_max != neg_inf();
            alphas[r] = select(1.0, exp(m[r] - new_max), seen);
            ps[r] = select(0.0, exp(score - new_max), seen);
            l[r] = l[r] * alphas[r] + ps[r];
            m[r] = new_max;
        }
        var v_read: array<vec4<f32>, READ_COLS>;
        for (var c4 = 0u; c4 < D4V; c4++) {
            if c4 % READ_COLS == 0u {
                v_read = read_v(v_base, c4 / READ_COLS);
            }
            let v4 = v_read[c4 % READ_COLS];
            for (var r = 0u; r < ROWS; r++) {
                let scaled = acc[r][c4] * alphas[r];
                acc[r][c4] = select(fma(vec4<f32>(ps[r]), v4, scaled), scaled, ps[r] == 0.0);
            }
        }
    }

    // Publish every invocation's state for every row of the block, then merge each row over
    // the invocations, which share its vec4 columns.
    for (var r = 0u; r < ROWS; r++) {
        let slot = r * WG + lane;
        lane_stats[slot] = vec2<f32>(m[r], l[r]);
        lane_poisoned[slot] = u32(poisoned[r]);
        for (var c4 = 0u; c4 < D4V; c4++) {
            lane_acc[slot * D4V + c4] = acc[r][c4];
        }
    }
    workgroupBarrier();

    // The merge reads only workgroup memory, so its loop over the rows needs no private array
    // indexed by the row. That loop runs to a bound known only at run time, the block's packed
    // rows, which keeps NIR from unrolling it: unrolled once per row, as the loops above are,
    // the merge took half of the first call's compile time (12.6 to 12.9 s in all at
    // B1 H32 H_kv8 Skv4096 D128 on lavapipe, against 6.0 s without a merge).
    let packed_rows = packed_rows_per_kv_head();
    let block_rows = min(ROWS, packed_rows - min(packed0, packed_rows));
    for (var r = 0u; r < block_rows; r++) {
        let row = packed_row(b, kv_head, seq, packed0 + r);
        if !row.valid {
            continue;
        }
        var row_max = neg_inf();
        var row_poisoned = false;
        for (var x = 0u; x < WG; x++) {
            row_max = max(row_max, lane_stats[r * WG + x].x);
            row_poisoned = row_poisoned || lane_poisoned[r * WG + x] != 0u;
        }
        let fully_masked = row_max == neg_inf();
        // An invocation that saw no key has m = -inf and weighs nothing.
        var weights: array<f32, WG>;
        var row_sum = 0.0;
        for (var x = 0u; x < WG; x++) {
            let stats = lane_stats[r * WG + x];
            weights[x] = select(0.0, exp(stats.x - row_max), stats.x != neg_inf() && !fully_masked);
            row_sum += stats.y * weights[x];
        }
        let inv_sum = select(1.0 / row_sum, 0.0, fully_masked);
        let stores = row_stores(b, seq, row, split);
        // Invocation x merges columns x, x + WG, and so on.
        for (var i = 0u; i < (D4V + WG - 1u) / WG; i++) {
            let c4 = lane + i * WG;
            if c4 < D4V {
                var merged = vec4<f32>(0.0);
                for (var x = 0u; x < WG; x++) {
                    merged += lane_acc[(r * WG + x) * D4V + c4] * weights[x];
                }
                merged *= inv_sum;
                for (var e = 0u; e < 4u; e++) {
                    let col = 4u * c4 + e;
                    if col < params.head_dim_v {
                        store_output(stores, col, merged[e], row_poisoned);
                    }
                }
            }
        }
        if lane == 0u {
            store_row_stats(stores, row_max, row_sum, row_poisoned);
        }
    }
}
