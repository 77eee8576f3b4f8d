//! Memory that grows with the inputs: the fused kernel computes attention whose score matrix
//! could never be stored, and the three-stage kernel rejects it with the limit it would exceed.

mod common;

use common::context;
use wgpu_attention::validate::{ErrorStats, Tolerance};
use wgpu_attention::{AttentionProblem, AttentionShape, Error, Kernel, reference};

#[test]
fn flash_runs_32k_by_32k() {
    // One head of 32,768 × 32,768 scores is 4 GiB: over every device's storage binding limit,
    // while the fused kernel needs Q, K, V, the output and its split partials (about 40 MiB).
    let shape = AttentionShape::new(1, 1, 32768, 32768, 64);
    let problem = AttentionProblem::new(shape);
    let data = crate::common::random_inputs(&problem, 32768, 0.0);

    let error = context()
        .attention_with(Kernel::ThreeStage, &problem, &data.inputs())
        .unwrap_err();
    match &error {
        Error::ExceedsLimit {
            value, limit_name, ..
        } => {
            assert_eq!(*value, 4 << 30);
            assert_eq!(*limit_name, "max_storage_buffer_binding_size");
        }
        other => panic!("expected ExceedsLimit from the three-stage kernel, got {other}"),
    }
    assert!(matches!(
        Kernel::Auto.resolve(&problem, context()),
        Kernel::FlashDecode | Kernel::FlashSubgroup | Kernel::FlashRows | Kernel::FlashTiled
    ));

    let start = std::time::Instant::now();
    let gpu = context()
        .attention_with(Kernel::Auto, &problem, &data.inputs())
        .unwrap();
    eprintln!("fused 32768 x 32768 x 64 took {:?}", start.elapsed());
    for i in [0, 1, 4095, 16383, 16384, 32766, 32767] {
        let row = reference::attention_row(&problem, &data.inputs(), 0, 0, i).unwrap();
        let stats = ErrorStats::compare(&gpu.out[i * 64..][..64], &row.out);
        assert!(stats.passes(&Tolerance::F32), "row {i}: {stats}");
        let lse = ErrorStats::compare(&gpu.lse[i..=i], &[row.lse]);
        assert!(lse.passes(&Tolerance::F32), "lse of row {i}: {lse}");
    }
}
