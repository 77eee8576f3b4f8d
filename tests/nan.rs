//! NaN and infinity in the inputs reach the same outputs on every kernel as in the reference.
//! A NaN or infinite score makes its row NaN, and a NaN in an attended key's value row makes
//! that column NaN. The value rows of masked keys are never used.

mod common;

use common::{RandomInputs, context};
use wgpu_attention::{AttentionProblem, AttentionShape, Causal, reference};

/// Asserts that `got` is NaN exactly where `expected` is, equal where it is infinite, and
/// within 1e-5 (relative above 1) elsewhere.
fn assert_same(name: &str, got: &[f32], expected: &[f64]) {
    assert_eq!(got.len(), expected.len(), "{name}");
    for (index, (&got, &want)) in got.iter().zip(expected).enumerate() {
        let got = f64::from(got);
        let same = if want.is_nan() {
            got.is_nan()
        } else if want.is_infinite() {
            got == want
        } else {
            (got - want).abs() <= 1e-5 * want.abs().max(1.0)
        };
        assert!(same, "{name}[{index}]: {got} vs {want}");
    }
}

fn check(name: &str, problem: &AttentionProblem, data: &RandomInputs, nan_rows: &[usize]) {
    let expected = reference::attention(problem, &data.inputs()).unwrap();
    // The case must put NaN where it means to, and nowhere else.
    let d = problem.shape.head_dim_v;
    for row in 0..expected.lse.len() {
        let any_nan = expected.out[row * d..][..d].iter().any(|x| x.is_nan());
        assert_eq!(
            any_nan,
            nan_rows.contains(&row),
            "{name}: reference row {row}"
        );
    }
    for kernel in common::kernels() {
        let gpu = context()
            .attention_with(kernel, problem, &data.inputs())
            .unwrap();
        let label = format!("{name} {}", kernel.name());
        assert_same(&format!("{label} out"), &gpu.out, &expected.out);
        assert_same(&format!("{label} lse"), &gpu.lse, &expected.lse);
    }
}

/// Head dims of the causal cases: at 128 the subgroup program stores its outputs through
/// workgroup memory, at 16 straight from its accumulators.
const HEAD_DIMS: [usize; 2] = [16, 128];

fn causal_problem(head_dim: usize) -> AttentionProblem {
    AttentionProblem::new(AttentionShape::new(1, 1, 40, 40, head_dim)).with_causal(Causal::TopLeft)
}

#[test]
fn masked_nan_value_unused() {
    // Key 30 is masked for rows 0 to 29, which share its key tile in every kernel.
    for d in HEAD_DIMS {
        let problem = causal_problem(d);
        let mut data = crate::common::random_inputs(&problem, 1, 0.0);
        data.v[30 * d + 3] = f32::NAN;
        data.v[31 * d] = f32::INFINITY;
        check("nan value", &problem, &data, &(30..40).collect::<Vec<_>>());
    }
}

#[test]
fn nan_key_makes_attending_rows_nan() {
    for d in HEAD_DIMS {
        let problem = causal_problem(d);
        let mut data = crate::common::random_inputs(&problem, 2, 0.0);
        data.k[10 * d + 5] = f32::NAN;
        check("nan key", &problem, &data, &(10..40).collect::<Vec<_>>());
    }
}

#[test]
fn nan_key_stays_nan_through_softcap() {
    // Soft-capping clamps the score before its tanh, and a clamp may turn NaN into a bound.
    for d in HEAD_DIMS {
        let problem = causal_problem(d).with_softcap(30.0);
        let mut data = crate::common::random_inputs(&problem, 2, 0.0);
        data.k[10 * d + 5] = f32::NAN;
        check(
            "nan key, soft-capped",
            &problem,
            &data,
            &(10..40).collect::<Vec<_>>(),
        );
    }
}

#[test]
fn large_finite_queries_stay_finite() {
    // Every product q·k overflows f32 unless the query is scaled first, while the scaled scores
    // stay below 2e38: queries of 2e38 / sqrt(d) over keys in [0, 1). Every kernel must scale
    // first, and pick the same key as the reference in each row.
    for d in HEAD_DIMS {
        let problem = causal_problem(d);
        let mut data = crate::common::random_inputs(&problem, 5, 0.0);
        data.q.fill(2e38 / (d as f32).sqrt());
        data.k.iter_mut().for_each(|x| *x = x.abs());
        check("large queries", &problem, &data, &[]);
    }
}

#[test]
fn infinite_query_makes_its_row_nan() {
    for d in HEAD_DIMS {
        let problem = causal_problem(d);
        let mut data = crate::common::random_inputs(&problem, 3, 0.0);
        data.q[5 * d] = f32::INFINITY;
        check("infinite query", &problem, &data, &[5]);
    }
}

#[test]
fn nan_in_the_mask_makes_its_row_nan() {
    let problem = AttentionProblem::new(AttentionShape::new(1, 2, 12, 30, 16)).with_mask(1, 1);
    let mut data = crate::common::random_inputs(&problem, 4, 0.1);
    data.mask.as_mut().unwrap()[7 * 30 + 3] = f32::NAN;
    check("nan mask", &problem, &data, &[7, 12 + 7]);
}

#[test]
fn padding_past_the_key_lengths_is_never_read() {
    let shape = AttentionShape::new(2, 2, 9, 50, 16);
    let problem = AttentionProblem::new(shape);
    let mut data = crate::common::random_inputs(&problem, 5, 0.0);
    data.kv_seq_lens = Some(vec![20, 50]);
    // Batch element 0, both heads: garbage from key 20 on.
    for head in 0..2 {
        let start = (head * 50 + 20) * 16;
        data.k[start..start + 30 * 16].fill(f32::NAN);
        data.v[start..start + 30 * 16].fill(f32::INFINITY);
    }
    check("padding", &problem, &data, &[]);
}

#[test]
fn nan_crosses_merged_key_splits() {
    // 3,000 keys for one query: the fused kernels split the keys and merge the parts.
    let shape = AttentionShape::new(1, 2, 1, 3000, 32);
    let problem = AttentionProblem::new(shape).with_window(Some(1500), None);
    let mut data = crate::common::random_inputs(&problem, 6, 0.0);
    // Head 0: a NaN key in the last split. Head 1: a NaN value outside the window.
    data.k[2500 * 32 + 1] = f32::NAN;
    data.v[(3000 + 100) * 32 + 7] = f32::NAN;
    check("split", &problem, &data, &[0]);
}
