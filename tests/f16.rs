//! f16 storage: Q, K, V and the output in f16, with every product, sum and softmax in f32.
//!
//! Contract: against the f64 reference on the same (f16) inputs, each kernel's output is within
//! `Tolerance::F16` and its error is at most twice that of `naive_f16_attention`, including
//! scores of ±1e4 and rows of 16,384 keys. Devices without SHADER_F16 convert on the host for
//! host slices and reject f16 GPU buffers.

mod common;

use common::{RandomInputs, context, device_with_limits};
use wgpu_attention::validate::{ErrorStats, Tolerance, naive_f16_attention};
use wgpu_attention::{
    AttentionInputs, AttentionInputsF16, AttentionProblem, AttentionShape, Causal, Context, Dtype,
    Error, GpuTensors, Kernel, OwnedInputs, f16, reference,
};

/// Inputs rounded to f16, as f16 and as the f32 values they represent.
struct HalfInputs {
    half: OwnedInputs<f16>,
    widened: RandomInputs,
}

impl HalfInputs {
    fn new(problem: &AttentionProblem, seed: u64, amplitude: f32) -> Self {
        Self::with(problem, seed, amplitude, |_| {})
    }

    /// Draws inputs and lets `setup` add optional tensors.
    fn with(
        problem: &AttentionProblem,
        seed: u64,
        amplitude: f32,
        setup: impl FnOnce(&mut RandomInputs),
    ) -> Self {
        let mut widened = crate::common::random_inputs(problem, seed, 0.1);
        setup(&mut widened);
        for values in [&mut widened.q, &mut widened.k, &mut widened.v] {
            values.iter_mut().for_each(|x| *x *= amplitude);
        }
        let half = widened.round_to_f16();
        Self { half, widened }
    }

    fn inputs(&self) -> AttentionInputsF16<'_> {
        self.half.inputs()
    }

    fn widened(&self) -> AttentionInputs<'_> {
        self.widened.inputs()
    }
}

/// Runs `kernel` in f16 on `context` and checks it against the reference and the naive f16
/// baseline.
fn assert_f16_matches(
    context: &Context,
    kernel: Kernel,
    problem: &AttentionProblem,
    data: &HalfInputs,
) {
    let name = format!("{} ({})", problem.label(), kernel.name());
    let gpu = context
        .attention_f16(kernel, problem, &data.inputs())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let out: Vec<f32> = gpu.out.iter().map(|x| x.to_f32()).collect();
    let expected = reference::attention(problem, &data.widened()).unwrap();
    let stats = ErrorStats::compare(&out, &expected.out);
    assert!(stats.passes(&Tolerance::F16), "{name}: {stats}");
    assert!(
        out.iter().all(|x| x.is_finite()),
        "{name}: non-finite output"
    );

    let naive = naive_f16_attention(problem, &data.widened()).unwrap();
    let naive_stats = ErrorStats::compare(&naive, &expected.out);
    assert!(
        stats.max_abs
            <= 2.0
                * naive_stats
                    .max_abs
                    .max(f64::from(f16::EPSILON.to_f32()) * stats.max_expected),
        "{name}: max_abs {} exceeds twice the naive f16 error {}",
        stats.max_abs,
        naive_stats.max_abs
    );
    let lse = ErrorStats::compare(&gpu.lse, &expected.lse);
    assert!(lse.passes(&Tolerance::F32), "{name} lse: {lse}");
}

#[test]
fn device_supports_f16_storage() {
    // lavapipe offers SHADER_F16; without it the tests below would only exercise the fallback.
    assert!(
        context().features().contains(wgpu::Features::SHADER_F16),
        "the test adapter lacks SHADER_F16"
    );
}

#[test]
fn f16_matches_reference_both_kernels() {
    let cases = [
        AttentionProblem::new(AttentionShape::new(2, 4, 17, 113, 64).with_kv_heads(2)),
        AttentionProblem::new(AttentionShape::new(1, 2, 33, 33, 59)).with_causal(Causal::TopLeft),
        AttentionProblem::new(AttentionShape::new(1, 8, 1, 500, 128).with_kv_heads(1)),
        // Head dim 40 reads vec4s of halves, while 64 and 128 read 16 halves at a time.
        AttentionProblem::new(AttentionShape::new(1, 4, 3, 77, 40).with_kv_heads(2)),
        AttentionProblem::new(AttentionShape::new(2, 2, 9, 9, 3)).with_mask(2, 1),
        AttentionProblem::new(AttentionShape::new(1, 4, 40, 90, 64).with_kv_heads(2))
            .with_softcap(20.0)
            .with_window(Some(10), Some(2)),
    ];
    for (seed, problem) in cases.iter().enumerate() {
        let data = HalfInputs::new(problem, seed as u64, 1.0);
        for kernel in common::kernels() {
            assert_f16_matches(context(), kernel, problem, &data);
        }
    }
}

#[test]
fn f16_with_every_variant() {
    // Packed BSHD sequences, a 192/128 head, ALiBi, sinks and key lengths, in f16 storage.
    let shape = AttentionShape::new(3, 4, 40, 96, 96)
        .with_kv_heads(2)
        .with_head_dim_v(64);
    let problem = AttentionProblem::new(shape)
        .with_causal(Causal::BottomRight)
        .with_layout(wgpu_attention::Layout::Bshd)
        .with_packed(40 + 1 + 25, 96 + 30 + 50);
    let data = HalfInputs::with(&problem, 12, 1.0, |data| {
        data.cu_seqlens = Some((vec![0, 40, 41, 66], vec![0, 96, 126, 176]));
        data.alibi_slopes = Some(vec![0.25, 0.0625, 0.015625, 0.00390625]);
        data.sinks = Some(vec![1.0, 0.0, -1.0, 3.0]);
        data.kv_seq_lens = Some(vec![90, 30, 10]);
    });
    for kernel in common::kernels() {
        assert_f16_matches(context(), kernel, &problem, &data);
    }
    let wide = AttentionShape::new(1, 2, 5, 70, 576).with_head_dim_v(512);
    let problem = AttentionProblem::new(wide);
    let data = HalfInputs::new(&problem, 13, 1.0);
    for kernel in [Kernel::ThreeStage, Kernel::FlashTiled] {
        assert_f16_matches(context(), kernel, &problem, &data);
    }
}

#[test]
fn f16_large_scores_stay_finite() {
    // Inputs up to ±120 with head dim 64 give scaled scores beyond ±1e4, far past what an f16
    // product or sum could hold without overflow to infinity.
    let problem = AttentionProblem::new(AttentionShape::new(1, 2, 40, 300, 64));
    let data = HalfInputs::new(&problem, 7, 120.0);
    let expected = reference::attention_row(&problem, &data.widened(), 0, 0, 0).unwrap();
    assert!(
        expected.lse > 1e4,
        "the case must reach scores over 1e4, got lse {}",
        expected.lse
    );
    for kernel in common::kernels() {
        assert_f16_matches(context(), kernel, &problem, &data);
    }
}

#[test]
fn f16_rows_of_16k_keys() {
    let problem = AttentionProblem::new(AttentionShape::new(1, 1, 4, 16384, 64))
        .with_causal(Causal::BottomRight);
    let data = HalfInputs::new(&problem, 9, 1.0);
    for kernel in common::kernels() {
        assert_f16_matches(context(), kernel, &problem, &data);
    }
}

#[test]
fn f16_without_shader_f16_converts_on_host() {
    let (device, queue) = device_with_limits(|_| {});
    let context = Context::from_device(device, queue);
    assert!(!context.features().contains(wgpu::Features::SHADER_F16));
    let problem = AttentionProblem::new(AttentionShape::new(1, 2, 17, 40, 32));
    let data = HalfInputs::new(&problem, 3, 1.0);
    assert_f16_matches(&context, Kernel::Auto, &problem, &data);
}

#[test]
fn f16_buffers_without_shader_f16_are_rejected() {
    let (device, queue) = device_with_limits(|_| {});
    let context = Context::from_device(device.clone(), queue);
    let problem = AttentionProblem::new(AttentionShape::new(1, 1, 4, 4, 4)).with_dtype(Dtype::F16);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let tensors = GpuTensors::new(&buffer, &buffer, &buffer, &buffer);
    let error = common::record_error(&context, &problem, &tensors);
    assert!(
        matches!(
            error,
            Error::MissingFeature {
                feature: "SHADER_F16",
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("convert"), "{error}");
}

#[test]
fn f16_problem_with_f32_slices_is_rejected() {
    let shape = AttentionShape::new(1, 1, 2, 2, 4);
    let problem = AttentionProblem::new(shape).with_dtype(Dtype::F16);
    let data = vec![0.0f32; 8];
    let inputs = AttentionInputs::new(&data, &data, &data);
    let error = context()
        .attention_with(Kernel::Auto, &problem, &inputs)
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::DtypeMismatch {
                dtype: "f16",
                given: "f32",
                ..
            }
        ),
        "{error}"
    );
}
