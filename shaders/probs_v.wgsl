// Stage 3 of the three-stage path: O = P V.
//
// Each workgroup computes one TILE_Q × TILE_D block of the output for one (batch, head). Its
// WG_D × WG_Q invocations each own ROWS × COLS outputs, strided so that neighbouring invocations
// write neighbouring columns. P and V are staged through workgroup memory TILE_KV keys at a
// time, with zeros past the edges. Keys that the causal mask, the window or the key length hides
// from every row of the tile have probability 0 and are skipped. The output's columns span the
// value head dim, which may differ from the query and key head dim.

const ROWS: u32 = 4u;
const COLS: u32 = 4u;
// Invocations along seq_q and head_dim, and keys staged per step. The host sets them in
// `kernels::tiling` and computes the dispatch grid from the same values.
override WG_Q: u32 = 16u;
override WG_D: u32 = 16u;
override TILE_KV: u32 = 16u;

@group(0) @binding(0) var<uniform> params: Params;
// [heads of this chunk, seq_q, seq_kv]: probabilities from stage 2.
@group(0) @binding(1) var<storage, read> probs: array<f32>;
// Values and the output, addressed through params.v_strides and params.out_strides.
@group(0) @binding(2) var<storage, read> v: array<Storage>;
@group(0) @binding(3) var<storage, read_write> out: array<Storage>;
// Per-head and per-sequence values; see params.wgsl.
@group(0) @binding(4) var<storage, read> aux: array<u32>;

// Probabilities of the tile, [TILE_Q][TILE_KV]: WG_Q · ROWS · TILE_KV · 4 bytes (4 KiB at the
// defaults).
var<workgroup> p_tile: array<f32, WG_Q * ROWS * TILE_KV>;
// Value rows of the tile, [TILE_KV][TILE_D]: TILE_KV · WG_D · COLS · 4 bytes (4 KiB at the
// defaults).
var<workgroup> v_tile: array<f32, TILE_KV * WG_D * COLS>;

@compute @workgroup_size(WG_D, WG_Q, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_id) local_id: vec3<u32>,
    @builtin(local_invocation_index) local_index: u32,
) {
    let tile_q = WG_Q * ROWS;
    let tile_d = WG_D * COLS;
    let invocations = WG_Q * WG_D;
    let group = workgroup_id + params.group_offset;
    let head = chunk_head(group.z);
    let d = params.head_dim_v;
    let seq = sequence(head.b);
    let p_base = head.chunk_index * params.seq_q * params.seq_kv;
    let row0 = group.y * tile_q;
    let col0 = group.x * tile_d;
    let key_end = block_key_end(seq, min(row0 + tile_q, seq.rows));
    let key_begin = window_key_begin(seq, row0);

    var acc: array<f32, ROWS * COLS>;
    for (var j0 = key_begin; j0 < key_end; j0 += TILE_KV) {
        // Load P: [tile_q][TILE_KV], zero past the sequence's rows and key_end.
        for (var t = local_index; t < tile_q * TILE_KV; t += invocations) {
            let row = row0 + t / TILE_KV;
            let key = j0 + t % TILE_KV;
            var value = 0.0;
            if row < seq.rows && key < key_end {
                value = probs[p_base + row * params.seq_kv + key];
            }
            p_tile[t] = value;
        }
        // Load V: [TILE_KV][tile_d], zero past key_end and head_dim.
        for (var t = local_index; t < TILE_KV * tile_d; t += invocations) {
            let key = j0 + t / tile_d;
            let col = col0 + t % tile_d;
            var value = 0.0;
            if key < key_end && col < d {
                value = f32(v[v_offset(head.b, head.kv_head, seq.key_begin + key) + col]);
            }
            v_tile[t] = value;
        }
        workgroupBarrier();

        for (var j = 0u; j < TILE_KV; j++) {
            var p_values: array<f32, ROWS>;
            for (var r = 0u; r < ROWS; r++) {
                p_values[r] = p_tile[(local_id.y + r * WG_Q) * TILE_KV + j];
            }
            // A key of probability 0, such as a masked one, leaves the accumulator as it is, so
            // a NaN or infinity in its value row cannot reach the output.
            for (var cc = 0u; cc < COLS; cc++) {
                let v_value = v_tile[j * tile_d + local_id.x + cc * WG_D];
                for (var r = 0u; r < ROWS; r++) {
                    let old = acc[r * COLS + cc];
                    // The ordered test p == 0.0 keeps a NaN p, which must propagate.
                    let sum = fma(p_values[r], v_value, old);
                    acc[r * COLS + cc] = select(sum, old, p_values[r] == 0.0);
                }
            }
        }
        workgroupBarrier();
    }

    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + local_id.y + r * WG_Q;
        if row >= seq.rows {
            continue;
        }
        let out_base = out_offset(head.b, head.h, seq.row_begin + row);
        for (var cc = 0u; cc < COLS; cc++) {
            let col = col0 + local_id.x + cc * WG_D;
            if col < d {
                out[out_base + col] = Storage(acc[r * COLS + cc]);
            }
        }
    }
}
