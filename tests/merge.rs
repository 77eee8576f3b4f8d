//! Merging results over disjoint key ranges: split a problem's keys in two, run each part on the
//! GPU, merge, and compare with the reference over all keys.

mod common;

use common::context;
use wgpu_attention::validate::{ErrorStats, Tolerance};
use wgpu_attention::{
    AttentionInputs, AttentionOutput, AttentionProblem, AttentionShape, Causal, Error, Kernel,
    merge_partials, reference,
};

/// Copies keys [begin, end) of every (batch, kv head) of `k` or `v`.
fn key_range(data: &[f32], shape: &AttentionShape, begin: usize, end: usize) -> Vec<f32> {
    let d = shape.head_dim;
    data.chunks(shape.seq_kv * d)
        .flat_map(|head| head[begin * d..end * d].iter().copied())
        .collect()
}

/// Copies mask columns [begin, end) of every row.
fn mask_columns(mask: &[f32], seq_kv: usize, begin: usize, end: usize) -> Vec<f32> {
    mask.chunks(seq_kv)
        .flat_map(|row| row[begin..end].iter().copied())
        .collect()
}

#[test]
fn merged_halves_match_full_attention() {
    let shape = AttentionShape::new(2, 4, 37, 150, 48).with_kv_heads(2);
    let full = AttentionProblem::new(shape).with_mask(2, 1);
    let data = crate::common::random_inputs(&full, 1, 0.2);
    let mask = data.mask.as_ref().unwrap();

    let split = 61;
    let mut parts = Vec::new();
    for (begin, end) in [(0, split), (split, shape.seq_kv)] {
        let part_shape = AttentionShape {
            seq_kv: end - begin,
            ..shape
        };
        let problem = AttentionProblem::new(part_shape)
            .with_scale(full.scale())
            .with_mask(2, 1);
        let k = key_range(&data.k, &shape, begin, end);
        let v = key_range(&data.v, &shape, begin, end);
        let part_mask = mask_columns(mask, shape.seq_kv, begin, end);
        let inputs = AttentionInputs {
            mask: Some(&part_mask),
            ..AttentionInputs::new(&data.q, &k, &v)
        };
        parts.push(
            context()
                .attention_with(Kernel::Auto, &problem, &inputs)
                .unwrap(),
        );
    }
    let merged = merge_partials(shape.head_dim, &parts[0], &parts[1]).unwrap();

    let expected = reference::attention(&full, &data.inputs()).unwrap();
    let out = ErrorStats::compare(&merged.out, &expected.out);
    assert!(out.passes(&Tolerance::F32), "output: {out}");
    let lse = ErrorStats::compare(&merged.lse, &expected.lse);
    assert!(lse.passes(&Tolerance::F32), "lse: {lse}");
}

#[test]
fn merge_with_empty_part_keeps_rows() {
    // A part in which no row saw a key, as when a key range is masked for every row, has output
    // 0 and lse -inf; merging it must return the other part unchanged.
    let shape = AttentionShape::new(1, 1, 8, 8, 4);
    let problem = AttentionProblem::new(shape).with_causal(Causal::BottomRight);
    let data = crate::common::random_inputs(&problem, 2, 0.0);
    let whole = context()
        .attention_with(Kernel::Auto, &problem, &data.inputs())
        .unwrap();
    let nothing = AttentionOutput {
        out: vec![0.0; whole.out.len()],
        lse: vec![f32::NEG_INFINITY; 8],
    };
    let merged = merge_partials(4, &whole, &nothing).unwrap();
    assert_eq!(merged.out, whole.out);
    assert_eq!(merged.lse, whole.lse);
    let both_empty = merge_partials(4, &nothing, &nothing).unwrap();
    assert!(both_empty.out.iter().all(|&x| x == 0.0));
    assert!(both_empty.lse.iter().all(|&x| x == f32::NEG_INFINITY));
}

#[test]
fn merge_rejects_mismatched_sizes() {
    let a = AttentionOutput {
        out: vec![0.0; 8],
        lse: vec![0.0; 2],
    };
    let b = AttentionOutput {
        out: vec![0.0; 12],
        lse: vec![0.0; 3],
    };
    let error = merge_partials(4, &a, &b).unwrap_err();
    assert!(
        matches!(
            error,
            Error::LengthMismatch {
                tensor: "lse",
                expected: 2,
                actual: 3,
                ..
            }
        ),
        "{error}"
    );
    let c = AttentionOutput {
        out: vec![0.0; 7],
        lse: vec![0.0; 2],
    };
    let error = merge_partials(4, &c, &a).unwrap_err();
    assert!(
        matches!(
            error,
            Error::LengthMismatch {
                tensor: "out",
                expected: 8,
                actual: 7,
                ..
            }
        ),
        "{error}"
    );
}
