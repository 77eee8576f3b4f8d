//! Real all-MiniLM-L6-v2 attention: every layer's captured Q, K, V and key-padding mask, checked
//! against the model's own attention output, probabilities' log-sum-exp and the f64 reference.

mod common;

use std::path::PathBuf;

use wgpu_attention::fixture::Fixture;
use wgpu_attention::validate::{ErrorStats, Tolerance};
use wgpu_attention::{Causal, Kernel, reference};

fn layers() -> Vec<(PathBuf, Fixture)> {
    (0..6)
        .map(|layer| {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/data/minilm_layer{layer}.safetensors"));
            let fixture = Fixture::load(&path).unwrap_or_else(|error| panic!("{error}"));
            (path, fixture)
        })
        .collect()
}

#[test]
fn fixtures_describe_minilm_batch() {
    for (path, fixture) in layers() {
        let s = fixture.problem.shape;
        let dims = [s.batch, s.heads, s.kv_heads, s.seq_q, s.seq_kv, s.head_dim];
        assert_eq!(dims, [2, 12, 12, 9, 9, 32], "{}", path.display());
        assert_eq!(fixture.problem.causal, Causal::None, "{}", path.display());
        assert!(
            fixture.tensors.mask.is_some(),
            "{} has no mask",
            path.display()
        );
        assert!(fixture.lse.is_some(), "{} has no lse", path.display());
        // The second sentence has 7 tokens: keys 7 and 8 of batch 1 are padding.
        let mask = fixture.tensors.mask.as_ref().unwrap();
        assert_eq!(mask[81 + 7], f32::MIN, "{}", path.display());
        assert_eq!(mask[81 + 6], 0.0, "{}", path.display());
    }
}

#[test]
fn reference_matches_model_output() {
    for (path, fixture) in layers() {
        let expected = reference::attention(&fixture.problem, &fixture.inputs()).unwrap();
        let out = ErrorStats::compare(&expected.out, fixture.out.as_deref().unwrap());
        assert!(out.passes(&Tolerance::F32), "{}: {out}", path.display());
        let lse = ErrorStats::compare(&expected.lse, fixture.lse.as_ref().unwrap());
        assert!(lse.passes(&Tolerance::F32), "{} lse: {lse}", path.display());
    }
}

#[test]
fn gpu_matches_model_output() {
    let context = common::context();
    for kernel in common::kernels() {
        for (path, fixture) in layers() {
            let name = format!("{} ({})", path.display(), kernel.name());
            let gpu = context
                .attention_with(kernel, &fixture.problem, &fixture.inputs())
                .unwrap();
            let out = ErrorStats::compare(&gpu.out, fixture.out.as_deref().unwrap());
            assert!(out.passes(&Tolerance::F32), "{name}: {out}");
            let lse = ErrorStats::compare(&gpu.lse, fixture.lse.as_ref().unwrap());
            assert!(lse.passes(&Tolerance::F32), "{name} lse: {lse}");
            let expected = reference::attention(&fixture.problem, &fixture.inputs()).unwrap();
            let against_reference = ErrorStats::compare(&gpu.out, &expected.out);
            assert!(
                against_reference.passes(&Tolerance::F32),
                "{name} vs reference: {against_reference}"
            );
        }
    }
}

#[test]
fn model_probabilities_match_reference() {
    for (path, fixture) in layers() {
        let probs = fixture.probs.as_ref().unwrap();
        let s = fixture.problem.shape;
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.seq_q {
                    let row =
                        reference::attention_row(&fixture.problem, &fixture.inputs(), b, h, i)
                            .unwrap();
                    let start = ((b * s.heads + h) * s.seq_q + i) * s.seq_kv;
                    let stats = ErrorStats::compare(&row.probs, &probs[start..start + s.seq_kv]);
                    assert!(
                        stats.passes(&Tolerance::F32),
                        "{} b{b} h{h} i{i}: {stats}",
                        path.display()
                    );
                }
            }
        }
    }
}

#[test]
fn wrong_kernel_would_fail() {
    // The tolerance must catch a plausible bug: dropping the padding mask changes the outputs of
    // the padded sentence far beyond it.
    let (path, fixture) = layers().swap_remove(0);
    let mut problem = fixture.problem;
    problem.mask = None;
    let mut inputs = fixture.inputs();
    inputs.mask = None;
    let unmasked = common::context()
        .attention_with(Kernel::ThreeStage, &problem, &inputs)
        .unwrap();
    let stats = ErrorStats::compare(&unmasked.out, fixture.out.as_deref().unwrap());
    assert!(
        !stats.passes(&Tolerance::F32),
        "{}: an unmasked run passed with {stats}",
        path.display()
    );
}

#[test]
fn gpu_probabilities_match_model() {
    let context = common::context();
    for (path, fixture) in layers() {
        let (output, probs) = context
            .attention_probs(&fixture.problem, &fixture.inputs())
            .unwrap();
        let expected = fixture.probs.as_ref().unwrap();
        let stats = ErrorStats::compare(&probs, expected);
        assert!(
            stats.passes(&Tolerance::F32),
            "{} probabilities: {stats}",
            path.display()
        );
        let out = ErrorStats::compare(&output.out, fixture.out.as_deref().unwrap());
        assert!(
            out.passes(&Tolerance::F32),
            "{} output: {out}",
            path.display()
        );
    }
}
