// Fused attention for CPU adapters that run a subgroup of 8 invocations as the lanes of one SIMD
// register, as llvmpipe does on 256-bit vectors.
//
// Same semantics, splits and outputs as `flash_rows.wgsl`. A workgroup is one subgroup of 8
// invocations and owns a block of 8 · ROWS packed rows of one key/value head; each invocation
// keeps ROWS of them, with their scaled query rows, online softmax states and output
// accumulators, in private arrays. The keys go by in steps of 8: each invocation reads the K and
// V rows of one key of the step, and subgroup broadcasts hand every row to all 8 invocations. So
// each K and V element is read from memory once per block of 8 · ROWS rows, and the arithmetic
// runs across rows in SIMD with no exchange of softmax states.
//
// On llvmpipe (Mesa 22.3) every read from a storage buffer or from workgroup memory is a loop
// over the SIMD lanes, whatever its address, while a broadcast from a constant lane moves data
// between registers. The reads are what `flash_decode.wgsl` and `flash_rows.wgsl` spend most of
// their time on; this program makes each serve 8 · ROWS rows, where they serve up to 4 and 1.

// The host declares these constants ahead of this file, as `const` rather than `override`:
// - SG: invocations per workgroup and keys per step, which must equal the subgroup size;
// - ROWS: packed rows per invocation; the block holds 8 · ROWS, row r of invocation x being
//   row x + 8 · r of the block;
// - D4 and D4V: vec4 columns of the query/key head dim and of the value head dim;
// - SOFTCAP, ALIBI and MASK: 1 where the problem has soft-capping, ALiBi or a mask, else 0;
// - STAGED_STORES: 1 where the block is large enough that its outputs go through workgroup
//   memory to rolled store loops, which compile faster, else 0 (see the end of main).
// As in `flash_decode.wgsl`, each loop over a private array runs over its whole length with the
// loop counter as the index, so that Mesa's NIR unrolls it and keeps the array in registers.

// The bindings and load_q come from fused_bindings.wgsl.

// The value `x` of each of the 8 invocations, in invocation order. The lane of a broadcast must
// be a constant, hence one call per lane, written for SG = 8.
const_assert SG == 8u;
fn spread(x: vec4<f32>) -> array<vec4<f32>, SG> {
    return array<vec4<f32>, SG>(
        subgroupBroadcast(x, 0u),
        subgroupBroadcast(x, 1u),
        subgroupBroadcast(x, 2u),
        subgroupBroadcast(x, 3u),
        subgroupBroadcast(x, 4u),
        subgroupBroadcast(x, 5u),
        subgroupBroadcast(x, 6u),
        subgroupBroadcast(x, 7u),
    );
}

// Each invocation's finished rows, at slot row · SG + invocation: the output divided by the
// row's sum, and whether a score made the row NaN. ROWS · SG · (16 · D4V + 4) bytes, at most
// 16,000 (4 rows with D4V = 31, which the column bounds allow).
var<workgroup> out_rows: array<vec4<f32>, ROWS * SG * D4V>;
var<workgroup> out_poisoned: array<u32, ROWS * SG>;

@compute @workgroup_size(SG, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
    @builtin(subgroup_invocation_id) subgroup_lane: u32,
) {
    let group = workgroup_id + params.group_offset;
    let bkv = group.z;
    let b = bkv / params.kv_heads;
    let kv_head = bkv % params.kv_heads;
    let packed_rows = packed_rows_per_kv_head();
    let block_q = SG * ROWS;
    let packed0 = group.x * block_q;
    let split = group.y;
    let seq = sequence(b);
    // The condition is the same for the whole subgroup, so every subgroup operation below runs
    // on all of its invocations.
    if split >= active_splits(seq) {
        return;
    }

    // This invocation's rows and their scaled query rows.
    var rows: array<PackedRow, ROWS>;
    var q_rows: array<array<vec4<f32>, D4>, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        rows[r] = packed_row(b, kv_head, seq, packed0 + lane + SG * r);
        for (var c4 = 0u; c4 < D4; c4++) {
            q_rows[r][c4] = load_q(rows[r].q_base, c4);
        }
    }

    // Keys of this split that some row of the block may attend to, the same for all 8
    // invocations.
    let keys = block_keys(seq, packed0, block_q, packed_rows, split);
    let key_begin = keys.x;
    let key_end = keys.y;

    // The sink joins each row's sum once, in the first split. `poisoned` records a NaN or +inf
    // score, which makes the row NaN as in the reference.
    var m: array<f32, ROWS>;
    var l: array<f32, ROWS>;
    var poisoned: array<bool, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        m[r] = neg_inf();
        l[r] = 0.0;
        poisoned[r] = false;
        let sink = sink_logit(rows[r].head);
        if split == 0u && sink != neg_inf() {
            m[r] = sink;
            l[r] = 1.0;
            poisoned[r] = poisons_row(sink);
        }
    }

    var acc: array<array<vec4<f32>, D4V>, ROWS>;
    for (var j0 = key_begin; j0 < key_end; j0 += SG) {
        // This invocation's key of the step: its K and V rows, zero past key_end. The key is
        // numbered by the subgroup lane, the lane each broadcast names. The row read is clamped
        // to key_end - 1 and the zero chosen by select, which keeps the unrolled loops free of
        // branches.
        let own_key = j0 + subgroup_lane;
        let in_range = own_key < key_end;
        let read_key = seq.key_begin + min(own_key, key_end - 1u);
        let k_base = k_offset(b, kv_head, read_key);
        let v_base = v_offset(b, kv_head, read_key);
        // Columns come READ_COLS at a time from read_k and read_v; once NIR unrolls these
        // loops, each read and its test on c4 are constant.
        var k_own: array<vec4<f32>, D4>;
        var k_read: array<vec4<f32>, READ_COLS>;
        for (var c4 = 0u; c4 < D4; c4++) {
            if c4 % READ_COLS == 0u {
                k_read = read_k(k_base, c4 / READ_COLS);
            }
            k_own[c4] = select(vec4<f32>(0.0), k_read[c4 % READ_COLS], in_range);
        }
        var v_own: array<vec4<f32>, D4V>;
        var v_read: array<vec4<f32>, READ_COLS>;
        for (var c4 = 0u; c4 < D4V; c4++) {
            if c4 % READ_COLS == 0u {
                v_read = read_v(v_base, c4 / READ_COLS);
            }
            v_own[c4] = select(vec4<f32>(0.0), v_read[c4 % READ_COLS], in_range);
        }

        // Scores of every row against the 8 keys of the step.
        var dots: array<array<vec4<f32>, SG>, ROWS>;
        for (var c4 = 0u; c4 < D4; c4++) {
            let keys = spread(k_own[c4]);
            for (var r = 0u; r < ROWS; r++) {
                for (var j = 0u; j < SG; j++) {
                    dots[r][j] = fma(q_rows[r][c4], keys[j], dots[r][j]);
                }
            }
        }

        // Online softmax update with the step's keys. A key of probability 0, such as one
        // outside the row's range, leaves the accumulator as it is, so a NaN or infinity in its
        // value row cannot reach the output; the ordered test p == 0.0 keeps a NaN p, which
        // must propagate.
        var alphas: array<f32, ROWS>;
        var ps: array<array<f32, SG>, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            var scores: array<f32, SG>;
            var step_max = neg_inf();
            for (var j = 0u; j < SG; j++) {
                let key = j0 + j;
                let dot4 = dots[r][j];
                var score = dot4.x + dot4.y + dot4.z + dot4.w;
                if SOFTCAP != 0u {
                    score = cap_score(score);
                }
                if ALIBI != 0u {
                    score += alibi_bias(rows[r].slope, rows[r].diagonal, key);
                }
                if MASK != 0u {
                    score += mask[rows[r].mask_row + min(key, params.seq_kv - 1u)];
                }
                let seen_key = key >= rows[r].keys.x && key < min(rows[r].keys.y, key_end);
                score = select(neg_inf(), score, seen_key);
                poisoned[r] = poisoned[r] || poisons_row(score);
                scores[j] = score;
                step_max = max(step_max, score);
            }
            let new_max = max(m[r], step_max);
            let seen = new_max != neg_inf();
            alphas[r] = select(1.0, exp(m[r] - new_max), seen);
            l[r] *= alphas[r];
            for (var j = 0u; j < SG; j++) {
                ps[r][j] = select(0.0, exp(scores[j] - new_max), seen);
                l[r] += ps[r][j];
            }
            m[r] = new_max;
        }
        for (var c4 = 0u; c4 < D4V; c4++) {
            let values = spread(v_own[c4]);
            for (var r = 0u; r < ROWS; r++) {
                var sum = acc[r][c4] * alphas[r];
                for (var j = 0u; j < SG; j++) {
                    let p = ps[r][j];
                    sum = select(fma(vec4<f32>(p), values[j], sum), sum, p == 0.0);
                }
                acc[r][c4] = sum;
            }
        }
    }

    // Small blocks store each row's output in the unrolled loop over the rows.
    if STAGED_STORES == 0u {
        for (var r = 0u; r < ROWS; r++) {
            let inv_sum = select(1.0 / l[r], 0.0, m[r] == neg_inf());
            let stores = row_stores(b, seq, rows[r], split);
            if rows[r].valid {
                for (var c4 = 0u; c4 < D4V; c4++) {
                    for (var e = 0u; e < 4u; e++) {
                        let col = 4u * c4 + e;
                        if col < params.head_dim_v {
                            store_output(stores, col, acc[r][c4][e] * inv_sum, poisoned[r]);
                        }
                    }
                }
                store_row_stats(stores, m[r], l[r], poisoned[r]);
            }
        }
        return;
    }

    // Larger blocks store each row's statistics, and keep its output, divided by its sum, in
    // workgroup memory.
    for (var r = 0u; r < ROWS; r++) {
        let slot = r * SG + lane;
        let inv_sum = select(1.0 / l[r], 0.0, m[r] == neg_inf());
        for (var c4 = 0u; c4 < D4V; c4++) {
            out_rows[slot * D4V + c4] = acc[r][c4] * inv_sum;
        }
        out_poisoned[slot] = u32(poisoned[r]);
        if rows[r].valid {
            store_row_stats(row_stores(b, seq, rows[r], split), m[r], l[r], poisoned[r]);
        }
    }

    // Then they store the outputs in loops bounded by values known only at run time, which NIR
    // leaves rolled. Unrolled over the rows and columns, the stores took 45% of the first call's
    // compile time at B1 H8 S2048 D64 on lavapipe (8.7 s in all, 4.7 s without them). Each
    // invocation reads back only the slots it wrote, so no barrier is needed.
    let own_rows = min(ROWS, (packed_rows - min(packed0 + lane, packed_rows) + SG - 1u) / SG);
    for (var r = 0u; r < own_rows; r++) {
        let row = packed_row(b, kv_head, seq, packed0 + lane + SG * r);
        if !row.valid {
            continue;
        }
        let slot = r * SG + lane;
        let stores = row_stores(b, seq, row, split);
        let row_poisoned = out_poisoned[slot] != 0u;
        for (var c4 = 0u; c4 < (params.head_dim_v + 3u) / 4u; c4++) {
            let values = out_rows[slot * D4V + c4];
            for (var e = 0u; e < 4u; e++) {
                let col = 4u * c4 + e;
                if col < params.head_dim_v {
                    store_output(stores, col, values[e], row_poisoned);
                }
            }
        }
    }
}
