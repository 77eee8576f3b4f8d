//! The attention variants beyond plain masking, on every kernel, against the f64 reference:
//! ALiBi, attention sinks, key lengths, value head dims unlike the key head dim, BSHD and
//! strided layouts read in place, and packed variable-length sequences.

mod common;

use common::{RandomInputs, Rng};
use wgpu_attention::{AttentionProblem, Layout, Strides, TensorStrides};

/// Returns the ALiBi slopes of a model with `heads` heads: `2^(-8 (h + 1) / heads)`.
fn alibi_slopes(heads: usize) -> Vec<f32> {
    (0..heads)
        .map(|h| 2f32.powf(-8.0 * (h + 1) as f32 / heads as f32))
        .collect()
}

/// Cumulative offsets of sequences of the given lengths.
fn offsets(lengths: &[u32]) -> Vec<u32> {
    std::iter::once(0)
        .chain(lengths.iter().scan(0, |total, &len| {
            *total += len;
            Some(*total)
        }))
        .collect()
}

/// Builds a packed problem of sequences with these (query, key) lengths, and its random inputs.
fn packed(
    problem: AttentionProblem,
    lengths: &[(u32, u32)],
    seed: u64,
) -> (AttentionProblem, RandomInputs) {
    let (q_lens, kv_lens): (Vec<u32>, Vec<u32>) = lengths.iter().copied().unzip();
    let (cu_q, cu_kv) = (offsets(&q_lens), offsets(&kv_lens));
    let problem = problem.with_packed(
        *cu_q.last().unwrap() as usize,
        *cu_kv.last().unwrap() as usize,
    );
    let mut data = crate::common::random_inputs(&problem, seed, 0.0);
    data.cu_seqlens = Some((cu_q, cu_kv));
    (problem, data)
}

macro_rules! variant_contract {
    ($module:ident, $kernel:expr, $max_head_dim:expr) => {
        mod $module {
            use super::*;
            use crate::common::{assert_matches_reference, context};
            use wgpu_attention::{AttentionShape, Causal, Kernel, KeyLengths};

            const KERNEL: Kernel = $kernel;
            const MAX_HEAD_DIM: usize = $max_head_dim;

            #[test]
            fn alibi_with_causal_and_window() {
                let cases = [
                    (17, 113, Causal::None, None),
                    (113, 113, Causal::TopLeft, None),
                    (40, 203, Causal::BottomRight, Some(31)),
                    (1, 203, Causal::None, None),
                ];
                for (seed, (seq_q, seq_kv, causal, window)) in cases.into_iter().enumerate() {
                    let shape = AttentionShape::new(2, 4, seq_q, seq_kv, 64).with_kv_heads(2);
                    let problem = AttentionProblem::new(shape)
                        .with_causal(causal)
                        .with_window(window, None);
                    let mut data = crate::common::random_inputs(&problem, seed as u64, 0.0);
                    data.alibi_slopes = Some(alibi_slopes(4));
                    assert_matches_reference(KERNEL, &problem, &data.inputs());
                }
            }

            #[test]
            fn alibi_with_softcap_and_mask() {
                let shape = AttentionShape::new(2, 3, 29, 71, 32);
                let problem = AttentionProblem::new(shape)
                    .with_softcap(5.0)
                    .with_mask(2, 1);
                let mut data = crate::common::random_inputs(&problem, 7, 0.2);
                data.alibi_slopes = Some(vec![0.5, 0.0, 2.0]);
                assert_matches_reference(KERNEL, &problem, &data.inputs());
            }

            #[test]
            fn sinks_join_the_denominator() {
                for (seed, causal) in [Causal::None, Causal::BottomRight].into_iter().enumerate() {
                    let shape = AttentionShape::new(2, 4, 33, 97, 64).with_kv_heads(1);
                    let problem = AttentionProblem::new(shape).with_causal(causal);
                    let mut data = crate::common::random_inputs(&problem, seed as u64, 0.0);
                    // Large, small, -inf (no sink) and one far above every score.
                    data.sinks = Some(vec![1.5, -3.0, f32::NEG_INFINITY, 40.0]);
                    assert_matches_reference(KERNEL, &problem, &data.inputs());
                }
            }

            #[test]
            fn sink_is_lse_of_masked_row() {
                // Rows 0 and 1 see no key under bottom-right causal masking with seq_q > seq_kv.
                let shape = AttentionShape::new(1, 2, 5, 3, 16);
                let problem = AttentionProblem::new(shape).with_causal(Causal::BottomRight);
                let mut data = crate::common::random_inputs(&problem, 3, 0.0);
                data.sinks = Some(vec![0.25, -2.0]);
                let output = context()
                    .attention_with(KERNEL, &problem, &data.inputs())
                    .unwrap();
                for (h, sink) in [0.25f32, -2.0].into_iter().enumerate() {
                    for row in 0..2 {
                        assert_eq!(output.lse[h * 5 + row], sink, "head {h} row {row}");
                        let out = &output.out[(h * 5 + row) * 16..][..16];
                        assert!(out.iter().all(|&x| x == 0.0), "head {h} row {row}: {out:?}");
                    }
                }
                assert_matches_reference(KERNEL, &problem, &data.inputs());
            }

            #[test]
            fn key_lengths_mask_padding() {
                let shape = AttentionShape::new(4, 4, 23, 150, 48).with_kv_heads(2);
                for (seed, causal) in [Causal::None, Causal::BottomRight].into_iter().enumerate() {
                    let problem = AttentionProblem::new(shape).with_causal(causal);
                    let mut data = crate::common::random_inputs(&problem, seed as u64, 0.0);
                    // Full, partial, a single key and none at all.
                    data.kv_seq_lens = Some(vec![150, 77, 1, 0]);
                    assert_matches_reference(KERNEL, &problem, &data.inputs());
                }
            }

            #[test]
            fn cache_lengths_place_diagonals() {
                // Chunked prefill of 5 rows over caches filled to 180, 37, 5 and 3 keys of 300:
                // the causal mask, the window and ALiBi all follow each length. The last
                // element has fewer keys than rows, so its first rows see none.
                let shape = AttentionShape::new(4, 8, 5, 300, 40).with_kv_heads(2);
                for (seed, window) in [None, Some(16)].into_iter().enumerate() {
                    let problem = AttentionProblem::new(shape)
                        .with_causal(Causal::BottomRight)
                        .with_window(window, None)
                        .with_key_lengths(KeyLengths::Cache);
                    let mut data = crate::common::random_inputs(&problem, 30 + seed as u64, 0.0);
                    data.kv_seq_lens = Some(vec![180, 37, 5, 3]);
                    data.alibi_slopes = Some(alibi_slopes(8));
                    assert_matches_reference(KERNEL, &problem, &data.inputs());
                }
            }

            #[test]
            fn key_lengths_with_padding_mask_and_sinks() {
                let shape = AttentionShape::new(2, 2, 9, 64, 32);
                let problem = AttentionProblem::new(shape).with_mask(2, 1);
                let mut data = crate::common::random_inputs(&problem, 11, 0.3);
                data.kv_seq_lens = Some(vec![40, 0]);
                data.sinks = Some(vec![0.0, 1.0]);
                assert_matches_reference(KERNEL, &problem, &data.inputs());
            }

            #[test]
            fn value_head_dim_differs() {
                let dims = [
                    (192, 128),
                    (128, 192),
                    (64, 32),
                    (40, 72),
                    (576, 512),
                    (3, 5),
                ];
                for (seed, (head_dim, head_dim_v)) in dims.into_iter().enumerate() {
                    let shape = AttentionShape::new(1, 4, 19, 83, head_dim)
                        .with_kv_heads(2)
                        .with_head_dim_v(head_dim_v);
                    let problem = AttentionProblem::new(shape).with_causal(Causal::BottomRight);
                    let data = crate::common::random_inputs(&problem, seed as u64, 0.0);
                    if head_dim.max(head_dim_v) <= MAX_HEAD_DIM {
                        assert_matches_reference(KERNEL, &problem, &data.inputs());
                    } else {
                        let result = context().attention_with(KERNEL, &problem, &data.inputs());
                        assert!(result.is_err(), "{head_dim}/{head_dim_v} must be rejected");
                    }
                }
            }

            #[test]
            fn bshd_layout_in_place() {
                let shape = AttentionShape::new(2, 4, 37, 53, 64).with_kv_heads(2);
                let problem = AttentionProblem::new(shape)
                    .with_causal(Causal::TopLeft)
                    .with_layout(Layout::Bshd);
                let data = crate::common::random_inputs(&problem, 5, 0.0);
                assert_matches_reference(KERNEL, &problem, &data.inputs());
            }

            #[test]
            fn strided_views_of_a_fused_projection() {
                // One [batch, seq, 3, heads, dim] buffer contains Q, K and V, and the output is BSHD.
                let (batch, heads, seq, dim) = (2, 3, 41, 32);
                let row = 3 * heads * dim;
                let view = Strides {
                    batch: seq * row,
                    head: dim,
                    seq: row,
                };
                let strides = TensorStrides {
                    q: view,
                    k: view,
                    v: view,
                    out: Strides {
                        batch: seq * heads * dim,
                        head: dim,
                        seq: heads * dim,
                    },
                };
                let shape = AttentionShape::new(batch, heads, seq, seq, dim);
                let problem = AttentionProblem::new(shape)
                    .with_causal(Causal::TopLeft)
                    .with_layout(Layout::Strided(strides));
                let qkv = Rng::new(9).symmetric_vec(batch * seq * row);
                let block = heads * dim;
                let inputs =
                    wgpu_attention::AttentionInputs::new(&qkv, &qkv[block..], &qkv[2 * block..]);
                assert_matches_reference(KERNEL, &problem, &inputs);
            }

            #[test]
            fn packed_sequences_of_different_lengths() {
                let lengths = [(17, 17), (1, 40), (33, 5), (0, 12), (64, 64)];
                for (seed, causal) in [Causal::None, Causal::BottomRight, Causal::TopLeft]
                    .into_iter()
                    .enumerate()
                {
                    for layout in [Layout::Bshd, Layout::Bhsd] {
                        let shape = AttentionShape::new(5, 4, 64, 64, 32).with_kv_heads(2);
                        let problem = AttentionProblem::new(shape)
                            .with_causal(causal)
                            .with_layout(layout);
                        let (problem, data) = packed(problem, &lengths, seed as u64);
                        assert_matches_reference(KERNEL, &problem, &data.inputs());
                    }
                }
            }

            #[test]
            fn packed_with_every_option() {
                // At head dim 128 the subgroup program stores its outputs through workgroup
                // memory, and at 40 straight from its accumulators.
                for head_dim in [40, 128] {
                    let lengths = [(30, 90), (7, 7), (50, 120)];
                    let shape = AttentionShape::new(3, 4, 50, 120, head_dim).with_kv_heads(4);
                    let problem = AttentionProblem::new(shape)
                        .with_causal(Causal::BottomRight)
                        .with_window(Some(20), Some(3))
                        .with_softcap(10.0)
                        .with_layout(Layout::Bshd);
                    let (problem, mut data) = packed(problem, &lengths, 21);
                    data.alibi_slopes = Some(alibi_slopes(4));
                    data.sinks = Some(vec![0.5, -1.0, 2.0, 0.0]);
                    data.kv_seq_lens = Some(vec![60, 7, 100]);
                    assert_matches_reference(KERNEL, &problem, &data.inputs());
                }
            }

            #[test]
            fn raw_scores_of_1e5_stay_exact() {
                // Integer inputs make every score exact in f32, up to ±160,000 here, so any
                // error comes from the softmax, not from rounding the products.
                let shape = AttentionShape::new(1, 2, 9, 50, 4);
                let problem = AttentionProblem::new(shape)
                    .with_scale(1.0)
                    .with_causal(Causal::BottomRight);
                let mut data = crate::common::random_inputs(&problem, 17, 0.0);
                let mut rng = Rng::new(18);
                let mut integers = |values: &mut Vec<f32>| {
                    for x in values.iter_mut() {
                        *x = (rng.symmetric() * 200.0).round();
                    }
                };
                integers(&mut data.q);
                integers(&mut data.k);

                // Head 1 gets only scores of -125,000 and below, and a sink just under them.
                for x in &mut data.q[9 * 4..] {
                    *x = 250.0;
                }
                for x in &mut data.k[50 * 4..] {
                    *x = -125.0 - (*x).abs() / 8.0;
                }
                data.sinks = Some(vec![f32::NEG_INFINITY, -125_003.0]);

                let expected = wgpu_attention::reference::attention(&problem, &data.inputs());
                let largest = expected
                    .unwrap()
                    .lse
                    .iter()
                    .fold(0.0f64, |a, &b| a.max(b.abs()));
                assert!(
                    largest > 1e5,
                    "the scores must reach 1e5, lse up to {largest}"
                );
                assert_matches_reference(KERNEL, &problem, &data.inputs());
            }

            #[test]
            fn long_rows_with_every_option() {
                // Long enough that the fused kernels split the keys and merge the splits.
                let shape = AttentionShape::new(1, 8, 3, 4000, 64).with_kv_heads(2);
                let problem = AttentionProblem::new(shape)
                    .with_causal(Causal::BottomRight)
                    .with_window(Some(3000), None)
                    .with_layout(Layout::Bshd);
                let mut data = crate::common::random_inputs(&problem, 4, 0.0);
                data.alibi_slopes = Some(vec![0.001; 8]);
                data.sinks = Some(vec![2.0; 8]);
                data.kv_seq_lens = Some(vec![3500]);
                assert_matches_reference(KERNEL, &problem, &data.inputs());
            }
        }
    };
}

variant_contract!(three_stage, wgpu_attention::Kernel::ThreeStage, 576);
variant_contract!(flash_tiled, wgpu_attention::Kernel::FlashTiled, 576);
variant_contract!(flash_rows, wgpu_attention::Kernel::FlashRows, 128);
variant_contract!(flash_decode, wgpu_attention::Kernel::FlashDecode, 128);
variant_contract!(flash_subgroup, wgpu_attention::Kernel::FlashSubgroup, 128);

/// A case's name, problem, inputs, and expected output and log-sum-exp.
type HandCase<'a> = (
    &'static str,
    AttentionProblem,
    wgpu_attention::AttentionInputs<'a>,
    Vec<f64>,
    Vec<f64>,
);

/// Cases small enough to compute by hand, checked on the reference and on every kernel: one
/// query, zero scores, so only the variant under test shapes the probabilities.
#[test]
fn hand_computed_values() {
    use wgpu_attention::{AttentionInputs, AttentionShape, Causal, reference};

    let e = std::f64::consts::E;
    let (q, k) = ([0.0f32], [0.0f32, 0.0]);
    let v = [1.0f32, 3.0];
    let one_query = AttentionProblem::new(AttentionShape::new(1, 1, 1, 2, 1));
    let base = AttentionInputs::new(&q[..], &k[..], &v[..]);
    let wide_v = [1.0f32, 10.0, 3.0, 30.0];
    let wide = AttentionProblem::new(AttentionShape::new(1, 1, 1, 2, 1).with_head_dim_v(2));
    // Packed: sequence 0 has one query and one key (value 5), sequence 1 one query and two keys.
    let (packed_q, packed_k, packed_v) = ([0.0f32, 0.0], [0.0f32; 3], [5.0f32, 1.0, 3.0]);
    let (cu_q, cu_kv) = ([0u32, 1, 2], [0u32, 1, 3]);
    let packed = AttentionProblem::new(AttentionShape::new(2, 1, 1, 2, 1)).with_packed(2, 3);
    let packed_inputs = AttentionInputs::new(&packed_q[..], &packed_k[..], &packed_v[..])
        .with_cu_seqlens(&cu_q, &cu_kv);

    let p0 = 1.0 / (1.0 + e);
    let cases: Vec<HandCase<'_>> = vec![
        (
            // Key 0 is one step left of the diagonal: bias -1.
            "alibi",
            one_query,
            base.with_alibi_slopes(&[1.0]),
            vec![p0 * 1.0 + (1.0 - p0) * 3.0],
            vec![(1.0 + 1.0 / e).ln()],
        ),
        (
            "sink",
            one_query,
            base.with_sinks(&[0.0]),
            vec![4.0 / 3.0],
            vec![3f64.ln()],
        ),
        (
            "key length",
            one_query,
            base.with_kv_seq_lens(&[1]),
            vec![1.0],
            vec![0.0],
        ),
        (
            "value head dim",
            wide,
            AttentionInputs::new(&q[..], &k[..], &wide_v[..]),
            vec![2.0, 20.0],
            vec![2f64.ln()],
        ),
        (
            "packed",
            packed,
            packed_inputs,
            vec![5.0, 2.0],
            vec![0.0, 2f64.ln()],
        ),
        (
            // Top-left causal places each sequence's own diagonal: sequence 1 attends to key 0 only.
            "packed causal",
            packed.with_causal(Causal::TopLeft),
            packed_inputs,
            vec![5.0, 1.0],
            vec![0.0, 0.0],
        ),
    ];
    for (name, problem, inputs, out, lse) in cases {
        let expected = reference::attention(&problem, &inputs).unwrap();
        for (got, want) in expected
            .out
            .iter()
            .zip(&out)
            .chain(expected.lse.iter().zip(&lse))
        {
            assert!(
                (got - want).abs() < 1e-12,
                "reference {name}: {got} vs {want}"
            );
        }
        for kernel in common::kernels() {
            let gpu = common::context()
                .attention_with(kernel, &problem, &inputs)
                .unwrap();
            let pairs = gpu.out.iter().zip(&out).chain(gpu.lse.iter().zip(&lse));
            for (&got, want) in pairs {
                assert!(
                    (f64::from(got) - want).abs() < 1e-6,
                    "{} {name}: {got} vs {want}",
                    kernel.name()
                );
            }
        }
    }
}

/// The three-stage kernel's probabilities with every variant: each row matches the reference's,
/// sums to less than 1 with a sink, and padding rows and keys of packed sequences read as 0.
#[test]
fn probabilities_with_every_variant() {
    use wgpu_attention::{AttentionShape, Causal, reference};

    let lengths = [(7, 30), (12, 12), (0, 5)];
    let shape = AttentionShape::new(3, 4, 12, 30, 24)
        .with_kv_heads(2)
        .with_head_dim_v(16);
    let problem = AttentionProblem::new(shape)
        .with_causal(Causal::BottomRight)
        .with_softcap(8.0)
        .with_layout(Layout::Bshd);
    let (problem, mut data) = packed(problem, &lengths, 31);
    data.alibi_slopes = Some(alibi_slopes(4));
    data.sinks = Some(vec![0.0, 1.0, -2.0, f32::NEG_INFINITY]);
    data.kv_seq_lens = Some(vec![25, 12, 5]);
    let inputs = data.inputs();
    let (output, probs) = common::context()
        .attention_probs(&problem, &inputs)
        .unwrap();
    let expected = reference::attention(&problem, &inputs).unwrap();
    let out = wgpu_attention::validate::ErrorStats::compare(&output.out, &expected.out);
    assert!(
        out.passes(&wgpu_attention::validate::Tolerance::F32),
        "{out}"
    );
    let (seq_q, seq_kv) = (12, 30);
    for (b, &(rows, keys)) in lengths.iter().enumerate() {
        for h in 0..4 {
            for i in 0..seq_q {
                let row = &probs[((b * 4 + h) * seq_q + i) * seq_kv..][..seq_kv];
                if i >= rows as usize {
                    assert!(row.iter().all(|&p| p == 0.0), "padding row {b} {h} {i}");
                    continue;
                }
                let want = reference::attention_row(&problem, &inputs, b, h, i).unwrap();
                assert_eq!(want.probs.len(), keys as usize);
                for (j, &p) in row.iter().enumerate() {
                    let expected = want.probs.get(j).copied().unwrap_or(0.0);
                    assert!(
                        (f64::from(p) - expected).abs() < 1e-6,
                        "row {b} {h} {i} key {j}: {p} vs {expected}"
                    );
                }
                let total: f32 = row.iter().sum();
                if h < 3 {
                    assert!(total < 0.999, "a sink leaves less than 1: {total}");
                }
            }
        }
    }
}

#[test]
fn cache_lengths_equal_a_cache_of_that_length() {
    // KeyLengths::Cache over a cache of 64 keys filled to `len` is the attention of the first
    // `len` keys alone, with the causal mask, the window and ALiBi placed by them.
    use wgpu_attention::{AttentionInputs, AttentionShape, Causal, KeyLengths, reference};
    let (heads, seq_q, capacity, dim) = (4, 3, 64, 8);
    let shape = AttentionShape::new(2, heads, seq_q, capacity, dim).with_kv_heads(2);
    let problem = AttentionProblem::new(shape)
        .with_causal(Causal::BottomRight)
        .with_window(Some(5), None)
        .with_key_lengths(KeyLengths::Cache);
    let data = common::random_inputs(&problem, 40, 0.0);
    let slopes = alibi_slopes(heads);

    let lens = [20u32, 2];
    let cached = reference::attention(
        &problem,
        &data
            .inputs()
            .with_kv_seq_lens(&lens)
            .with_alibi_slopes(&slopes),
    )
    .unwrap();
    for (b, &len) in lens.iter().enumerate() {
        let len = len as usize;
        let alone =
            AttentionProblem::new(AttentionShape::new(1, heads, seq_q, len, dim).with_kv_heads(2))
                .with_causal(Causal::BottomRight)
                .with_window(Some(5), None);

        let rows = |tensor: &[f32], heads: usize, seq: usize, keep: usize| {
            let per_batch = heads * seq * dim;
            tensor[b * per_batch..][..per_batch]
                .chunks(seq * dim)
                .flat_map(|head| head[..keep * dim].to_vec())
                .collect::<Vec<f32>>()
        };
        let (q, k, v) = (
            rows(&data.q, heads, seq_q, seq_q),
            rows(&data.k, 2, capacity, len),
            rows(&data.v, 2, capacity, len),
        );
        let expected = reference::attention(
            &alone,
            &AttentionInputs::new(&q, &k, &v).with_alibi_slopes(&slopes),
        )
        .unwrap();

        let out_len = heads * seq_q * dim;
        let got = &cached.out[b * out_len..][..out_len];
        for (x, y) in got.iter().zip(&expected.out) {
            assert!((x - y).abs() < 1e-12, "batch {b}: {x} against {y}");
        }
        let lse = &cached.lse[b * heads * seq_q..][..heads * seq_q];
        for (x, y) in lse.iter().zip(&expected.lse) {
            assert!(
                x == y || (x - y).abs() < 1e-12,
                "batch {b}: lse {x} against {y}"
            );
        }
    }
}
