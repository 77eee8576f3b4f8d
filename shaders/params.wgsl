// Parameters shared by every program. The host struct `KernelParams` in
// src/kernels/mod.rs has the same fields in the same order.
struct Params {
    batch: u32,
    heads: u32,
    kv_heads: u32,
    seq_q: u32,
    seq_kv: u32,
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
    // Fused kernel only: keys per split of the key range, and the number of splits. With more
    // than one split, each writes a partial result that `combine.wgsl` merges.
    keys_per_split: u32,
    kv_splits: u32,
    // Logit soft-capping value, or 0 for none.
    softcap: f32,
    // Sliding-window keys before and after the bottom-right diagonal, or -1 for unbounded.
    window_left: i32,
    window_right: i32,
}

// Negative infinity, built at run time because WGSL constant expressions may not be infinite.
fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

// Whether query row `i` may attend to key `j` under the causal mask.
fn causal_allows(p: Params, i: u32, j: u32) -> bool {
    switch p.causal {
        case 1u: {
            return j <= i;
        }
        case 2u: {
            // j <= i + seq_kv - seq_q, written without unsigned underflow.
            return j + p.seq_q <= i + p.seq_kv;
        }
        default: {
            return true;
        }
    }
}

// Soft-caps a scaled score: softcap · tanh(s / softcap). The argument is clamped to ±15, where
// tanh is ±1 in f32, because some drivers compute tanh through exp and overflow to NaN beyond.
// WGSL lets tanh be accurate only in absolute terms (lavapipe's error was about 6e-8, which
// softcap = 30 turns into 2e-6 on scores near 0), so below |x| = 0.125 the odd Taylor series
// x - x³/3 + 2x⁵/15 - 17x⁷/315 is used instead; its next term is under 2e-10 relative there.
fn cap_score(p: Params, s: f32) -> f32 {
    if p.softcap <= 0.0 {
        return s;
    }
    let x = clamp(s / p.softcap, -15.0, 15.0);
    let x2 = x * x;
    let series = x * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))));
    return p.softcap * select(tanh(x), series, abs(x) < 0.125);
}

// Whether query row `i` may attend to key `j` under the causal mask and the sliding window.
fn allows(p: Params, i: u32, j: u32) -> bool {
    // The bottom-right diagonal of row i, which is negative when seq_q > seq_kv + i.
    let diagonal = i32(i) + i32(p.seq_kv) - i32(p.seq_q);
    let left_ok = p.window_left < 0 || i32(j) >= diagonal - p.window_left;
    let right_ok = p.window_right < 0 || i32(j) <= diagonal + p.window_right;
    return causal_allows(p, i, j) && left_ok && right_ok;
}

// The first key that row `first_row` (and so any later row) may attend to under the window.
fn window_key_begin(p: Params, first_row: u32) -> u32 {
    if p.window_left < 0 {
        return 0u;
    }
    let begin = i32(first_row) + i32(p.seq_kv) - i32(p.seq_q) - p.window_left;
    return u32(clamp(begin, 0, i32(p.seq_kv)));
}

// One past the last key that any row before `row_end` may attend to under the causal mask and
// the window, clamped to seq_kv. Keys from here on are masked for the whole tile and skipped.
fn block_key_end(p: Params, row_end: u32) -> u32 {
    var end = causal_key_end(p, row_end);
    if p.window_right >= 0 {
        let last = i32(row_end) - 1 + i32(p.seq_kv) - i32(p.seq_q) + p.window_right;
        end = min(end, u32(clamp(last + 1, 0, i32(p.seq_kv))));
    }
    return end;
}

// One past the last key that any row in [row_begin, row_end) may attend to under the causal
// mask, clamped to seq_kv.
fn causal_key_end(p: Params, row_end: u32) -> u32 {
    let last_row = row_end - 1u;
    switch p.causal {
        case 1u: {
            return min(last_row + 1u, p.seq_kv);
        }
        case 2u: {
            if last_row + p.seq_kv < p.seq_q {
                return 0u;
            }
            return min(last_row + p.seq_kv - p.seq_q + 1u, p.seq_kv);
        }
        default: {
            return p.seq_kv;
        }
    }
}
