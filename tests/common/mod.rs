//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::sync::OnceLock;

use wgpu_attention::Context;

/// One context for the whole test binary, so pipelines compile once. Fails the test, with the
/// install hint, when there is no adapter: GPU tests never pass by skipping.
pub fn context() -> &'static Context {
    static CONTEXT: OnceLock<Context> = OnceLock::new();
    CONTEXT.get_or_init(|| match Context::new() {
        Ok(context) => context,
        Err(error) => panic!("no GPU adapter for the tests: {error}"),
    })
}

/// The crate's deterministic generator, so failures reproduce from the seed alone.
pub use wgpu_attention::random::SplitMix64 as Rng;

use wgpu_attention::validate::{ErrorStats, Tolerance};
use wgpu_attention::{AttentionInputs, AttentionProblem, Error, Kernel, OwnedInputs, reference};

/// Every kernel that names one program: the three-stage kernel and each fused program.
pub const KERNELS: [Kernel; 5] = [
    Kernel::ThreeStage,
    Kernel::FlashTiled,
    Kernel::FlashRows,
    Kernel::FlashDecode,
    Kernel::FlashSubgroup,
];

/// Returns whether `context`'s device has subgroups of exactly 8 invocations, which the subgroup
/// program needs. lavapipe on Vulkan has them, and its GL driver has no subgroups.
pub fn has_subgroups_of_8(context: &Context) -> bool {
    let info = context.adapter_info();
    context.features().contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size == 8
        && info.subgroup_max_size == 8
}

/// Returns whether `kernel` runs on `context`'s device, head-dim limits aside.
pub fn runs_on(context: &Context, kernel: Kernel) -> bool {
    kernel != Kernel::FlashSubgroup || has_subgroups_of_8(context)
}

/// Returns the kernels of [`KERNELS`] that run on the shared context: all five on lavapipe's
/// Vulkan driver, which `tests/kernels.rs` checks.
pub fn kernels() -> Vec<Kernel> {
    KERNELS
        .into_iter()
        .filter(|&kernel| runs_on(context(), kernel))
        .collect()
}

/// Random inputs for the tests; the optional tensors start empty and tests set the ones they
/// need.
pub type RandomInputs = OwnedInputs;

/// Draws inputs for `problem` with values in [-1, 1), over every element the layout spans
/// (gaps of strided views included), and a mask when the problem has one: its entries are
/// -inf with probability `masked_fraction`, else in [-1, 1).
pub fn random_inputs(problem: &AttentionProblem, seed: u64, masked_fraction: f32) -> OwnedInputs {
    let mut rng = Rng::new(seed);
    let [q_len, k_len, v_len, _] = problem.spans();
    let q = rng.symmetric_vec(q_len);
    let k = rng.symmetric_vec(k_len);
    let v = rng.symmetric_vec(v_len);
    let mask = problem.mask.map(|_| {
        (0..problem.mask_len())
            .map(|_| {
                let masked = (rng.symmetric() + 1.0) / 2.0 < masked_fraction;
                if masked {
                    f32::NEG_INFINITY
                } else {
                    rng.symmetric()
                }
            })
            .collect()
    });
    OwnedInputs {
        q,
        k,
        v,
        mask,
        ..OwnedInputs::default()
    }
}

/// Runs `kernel` on the shared context and asserts that output and log-sum-exp match the f64
/// reference within the f32 tolerance.
pub fn assert_matches_reference(
    kernel: Kernel,
    problem: &AttentionProblem,
    inputs: &AttentionInputs<'_>,
) {
    assert_matches_reference_on(context(), kernel, problem, inputs);
}

/// Runs `kernel` on `context` and asserts that output and log-sum-exp match the f64 reference
/// within the f32 tolerance.
pub fn assert_matches_reference_on(
    context: &Context,
    kernel: Kernel,
    problem: &AttentionProblem,
    inputs: &AttentionInputs<'_>,
) {
    let result = context.attention_with(kernel, problem, inputs);
    if !runs_on(context, kernel) {
        // The device cannot run the program, so the call must return a typed error.
        let error = result.unwrap_err();
        assert!(matches!(error, Error::Unsupported { .. }), "{error}");
        return;
    }
    let gpu = result.unwrap_or_else(|error| panic!("{}: {error}", problem.label()));
    let expected = reference::attention(problem, inputs).unwrap();
    let out = ErrorStats::compare(&gpu.out, &expected.out);
    assert!(
        out.passes(&Tolerance::F32),
        "{} output: {out}",
        problem.label()
    );
    let lse = ErrorStats::compare(&gpu.lse, &expected.lse);
    assert!(
        lse.passes(&Tolerance::F32),
        "{} lse: {lse}",
        problem.label()
    );
}

/// Creates a device on the default adapter, with no optional features and with `adjust` applied
/// to the adapter's limits.
/// Records `problem` on `tensors` with [`Kernel::Auto`] into a new encoder, expecting an error,
/// and returns it.
pub fn record_error(
    context: &Context,
    problem: &AttentionProblem,
    tensors: &wgpu_attention::GpuTensors<'_>,
) -> Error {
    let mut encoder = context.device().create_command_encoder(&Default::default());
    match context.record(Kernel::Auto, problem, &mut encoder, tensors) {
        Ok(()) => panic!("record accepted the call; expected an error"),
        Err(error) => error,
    }
}

pub fn device_with_limits(adjust: impl FnOnce(&mut wgpu::Limits)) -> (wgpu::Device, wgpu::Queue) {
    let adapter =
        wgpu_attention::select_adapter(std::env::var(wgpu_attention::ADAPTER_ENV).ok().as_deref())
            .unwrap_or_else(|error| panic!("no GPU adapter for the tests: {error}"));
    let mut limits = adapter.limits();
    adjust(&mut limits);
    let descriptor = wgpu::DeviceDescriptor {
        required_limits: limits,
        ..Default::default()
    };
    pollster::block_on(adapter.request_device(&descriptor)).unwrap()
}
