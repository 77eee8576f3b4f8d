//! Bad input returns a typed error that names the value, never a panic or a wrong result.

mod common;

use std::collections::HashMap;

use wgpu_attention::fixture::Fixture;
use wgpu_attention::{
    AttentionInputs, AttentionProblem, AttentionShape, Context, Error, Kernel, reference,
};

fn run(problem: &AttentionProblem, inputs: &AttentionInputs<'_>) -> Error {
    let gpu = common::context()
        .attention_with(Kernel::ThreeStage, problem, inputs)
        .unwrap_err();
    let cpu = reference::attention(problem, inputs).unwrap_err();
    assert_eq!(
        gpu.to_string(),
        cpu.to_string(),
        "GPU and reference disagree on the error"
    );
    gpu
}

fn zeros(n: usize) -> Vec<f32> {
    vec![0.0; n]
}

#[test]
fn slice_length_mismatch() {
    let shape = AttentionShape::new(2, 4, 5, 7, 8).with_kv_heads(2);
    let problem = AttentionProblem::new(shape);
    let (q, kv) = (zeros(shape.q_len()), zeros(shape.k_len()));
    let short = zeros(shape.k_len() - 1);
    let cases: [(&str, AttentionInputs<'_>); 3] = [
        ("q", AttentionInputs::new(&short, &kv, &kv)),
        ("k", AttentionInputs::new(&q, &short, &kv)),
        ("v", AttentionInputs::new(&q, &kv, &short)),
    ];
    for (name, inputs) in cases {
        let error = run(&problem, &inputs);
        match &error {
            Error::LengthMismatch { tensor, .. } => assert_eq!(*tensor, name),
            other => panic!("{name}: expected LengthMismatch, got {other}"),
        }
        assert!(error.to_string().contains(&format!("`{name}`")), "{error}");
    }
}

#[test]
fn mask_length_mismatch() {
    let shape = AttentionShape::new(2, 4, 5, 7, 8);
    let problem = AttentionProblem::new(shape).with_mask(2, 1);
    let (q, kv) = (zeros(shape.q_len()), zeros(shape.k_len()));
    let mask = zeros(5 * 7);
    let error = run(
        &problem,
        &AttentionInputs {
            mask: Some(&mask),
            ..AttentionInputs::new(&q, &kv, &kv)
        },
    );
    assert!(
        matches!(
            error,
            Error::LengthMismatch {
                tensor: "mask",
                expected: 70,
                actual: 35,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("[2, 1, 5, 7]"), "{error}");
}

#[test]
fn zero_dimensions() {
    let names = [
        "batch",
        "heads",
        "kv_heads",
        "seq_q",
        "seq_kv",
        "head_dim",
        "head_dim_v",
    ];
    for (index, name) in names.into_iter().enumerate() {
        let mut dims = [1usize; 7];
        dims[index] = 0;
        let shape = AttentionShape {
            batch: dims[0],
            heads: dims[1],
            kv_heads: dims[2],
            seq_q: dims[3],
            seq_kv: dims[4],
            head_dim: dims[5],
            head_dim_v: dims[6],
        };
        let error = AttentionProblem::new(shape).validate().unwrap_err();
        assert!(
            matches!(error, Error::ZeroDimension { name: n } if n == name),
            "{name}: {error}"
        );
        assert!(error.to_string().contains(name), "{error}");
    }
}

#[test]
fn heads_not_divisible_by_kv_heads() {
    let shape = AttentionShape::new(1, 6, 4, 4, 8).with_kv_heads(4);
    let problem = AttentionProblem::new(shape);
    let (q, kv) = (zeros(shape.q_len()), zeros(shape.k_len()));
    let error = run(&problem, &AttentionInputs::new(&q, &kv, &kv));
    assert!(
        matches!(
            error,
            Error::HeadsNotDivisible {
                heads: 6,
                kv_heads: 4
            }
        ),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("set kv_heads to one of 1, 2, 3, 6"),
        "{error}"
    );
}

#[test]
fn head_dim_over_maximum() {
    let shape = AttentionShape::new(1, 1, 2, 2, wgpu_attention::MAX_HEAD_DIM + 1);
    let problem = AttentionProblem::new(shape);
    let (q, kv) = (zeros(shape.q_len()), zeros(shape.k_len()));
    let error = run(&problem, &AttentionInputs::new(&q, &kv, &kv));
    assert!(
        matches!(
            error,
            Error::HeadDimTooLarge {
                name: "head_dim",
                head_dim: 577,
                max: 576
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("head_dim must be at most 576"),
        "{error}"
    );
}

#[test]
fn mask_shape_does_not_broadcast() {
    for (mask_batch, mask_heads) in [(3, 1), (1, 2), (0, 1)] {
        let shape = AttentionShape::new(2, 4, 3, 3, 4);
        let error = AttentionProblem::new(shape)
            .with_mask(mask_batch, mask_heads)
            .validate()
            .unwrap_err();
        assert!(
            matches!(error, Error::MaskShape { .. }),
            "{mask_batch}x{mask_heads}: {error}"
        );
        assert!(
            error
                .to_string()
                .contains(&format!("[{mask_batch}, {mask_heads}, seq_q, seq_kv]")),
            "{error}"
        );
    }
}

#[test]
fn mask_given_without_mask_shape_and_reverse() {
    let shape = AttentionShape::new(1, 1, 3, 3, 4);
    let (q, kv, mask) = (zeros(shape.q_len()), zeros(shape.k_len()), zeros(9));
    let without_shape = AttentionProblem::new(shape);
    let error = run(
        &without_shape,
        &AttentionInputs {
            mask: Some(&mask),
            ..AttentionInputs::new(&q, &kv, &kv)
        },
    );
    assert!(matches!(error, Error::MaskMismatch(_)), "{error}");
    let with_shape = AttentionProblem::new(shape).with_mask(1, 1);
    let error = run(&with_shape, &AttentionInputs::new(&q, &kv, &kv));
    assert!(matches!(error, Error::MaskMismatch(_)), "{error}");
}

#[test]
fn scale_not_finite() {
    let shape = AttentionShape::new(1, 1, 2, 2, 4);
    // 1e39 is finite in f64 but infinite in the kernels' f32.
    for scale in [f64::NAN, f64::INFINITY, 1e39, -1e300] {
        let error = AttentionProblem::new(shape)
            .with_scale(scale)
            .validate()
            .unwrap_err();
        assert!(matches!(error, Error::InvalidScale { .. }), "{error}");
        assert!(error.to_string().contains("3.4e38"), "{error}");
    }
    for scale in [-3e38, 1e-300, 0.0] {
        let problem = AttentionProblem::new(shape).with_scale(scale);
        assert!(problem.validate().is_ok(), "{scale}");
    }
}

#[test]
fn unknown_adapter_lists_available() {
    let error = Context::with_adapter(Some("no-such-adapter-xyz")).unwrap_err();
    match &error {
        Error::AdapterNotFound { request, available } => {
            assert_eq!(request, "no-such-adapter-xyz");
            assert!(!available.is_empty());
        }
        other => panic!("expected AdapterNotFound, got {other}"),
    }
    assert!(error.to_string().contains("wgpu-attention info"), "{error}");
}

#[test]
fn subgroup_program_names_what_lacks_subgroups() {
    let problem = AttentionProblem::new(AttentionShape::new(1, 1, 16, 16, 16));
    let data = wgpu_attention::OwnedInputs::random(&problem, 16);
    let run = |context: &Context| {
        context
            .attention_with(Kernel::FlashSubgroup, &problem, &data.inputs())
            .unwrap_err()
            .to_string()
    };

    // The caller created its device without SUBGROUP, which it can add where the adapter has it.
    let (device, queue) = common::device_with_limits(|_| {});
    let message = run(&Context::from_device(device, queue));
    assert!(
        message.contains("a device without the SUBGROUP feature"),
        "{message}"
    );
    assert!(
        message.contains("create the device with wgpu::Features::SUBGROUP"),
        "{message}"
    );

    // The adapter offers no subgroups, so no device of it can have them: the message names the
    // adapter and does not ask for the feature.
    let mut without_subgroups = 0;
    for adapter in wgpu_attention::enumerate_adapters() {
        if adapter.features().contains(wgpu::Features::SUBGROUP) {
            continue;
        }
        without_subgroups += 1;
        let context = pollster::block_on(Context::from_adapter(&adapter)).unwrap();
        let message = run(&context);
        let name = &adapter.get_info().name;
        assert!(message.contains(&format!("{name} (")), "{message}");
        assert!(message.contains("offers no SUBGROUP feature"), "{message}");
        assert!(!message.contains("create the device"), "{message}");
    }

    // The Mesa packages that bring lavapipe bring its GL driver too, which has no subgroups.
    if common::context().adapter_info().name.contains("llvmpipe") {
        assert!(
            without_subgroups > 0,
            "no adapter without subgroups; expected llvmpipe on GL"
        );
    }
}

#[test]
fn no_adapter_message_tells_how_to_install() {
    let message = Error::NoAdapter.to_string();
    assert!(message.contains("mesa-vulkan-drivers"), "{message}");
    assert!(message.contains("lavapipe"), "{message}");
}

/// Writes a fixture file `name` in a new temporary directory, which the caller keeps alive while
/// it uses the file. Key lengths are stored as I32, as the fixture format stores them, and every
/// other tensor as F32.
fn write_fixture(
    name: &str,
    tensors: Vec<(&str, Vec<usize>, Vec<f32>)>,
    metadata: &[(&str, &str)],
) -> (tempfile::TempDir, std::path::PathBuf) {
    let bytes: Vec<(&str, Vec<usize>, Vec<u8>, safetensors::Dtype)> = tensors
        .into_iter()
        .map(|(name, dims, data)| {
            if name == "kv_seq_lens" {
                let data = data
                    .iter()
                    .flat_map(|&x| (x as i32).to_le_bytes())
                    .collect();
                (name, dims, data, safetensors::Dtype::I32)
            } else {
                let data = data.iter().flat_map(|x| x.to_le_bytes()).collect();
                (name, dims, data, safetensors::Dtype::F32)
            }
        })
        .collect();
    write_raw(name, bytes, metadata)
}

/// Writes tensors given as raw little-endian bytes with their dtypes, as `write_fixture` does.
fn write_raw(
    name: &str,
    bytes: Vec<(&str, Vec<usize>, Vec<u8>, safetensors::Dtype)>,
    metadata: &[(&str, &str)],
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("wgpu-attention-errors-")
        .tempdir()
        .unwrap();
    let path = dir.path().join(name);
    let views: Vec<_> = bytes
        .iter()
        .map(|(name, dims, data, dtype)| {
            (
                *name,
                safetensors::tensor::TensorView::new(*dtype, dims.clone(), data).unwrap(),
            )
        })
        .collect();
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    std::fs::write(
        &path,
        safetensors::serialize(views, Some(metadata)).unwrap(),
    )
    .unwrap();
    (dir, path)
}

/// Writes a fixture as `write_fixture` does, loads it, which must fail, and asserts that the
/// error message contains `expected`.
fn assert_load_fails(
    name: &str,
    tensors: Vec<(&str, Vec<usize>, Vec<f32>)>,
    metadata: &[(&str, &str)],
    expected: &str,
) {
    let (_dir, path) = write_fixture(name, tensors, metadata);
    let error = Fixture::load(&path).unwrap_err();
    assert!(error.to_string().contains(expected), "{error}");
}

fn small_case() -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
    let dims = vec![1, 1, 2, 4];
    vec![
        ("q", dims.clone(), zeros(8)),
        ("k", dims.clone(), zeros(8)),
        ("v", dims.clone(), zeros(8)),
        ("out", dims, zeros(8)),
    ]
}

#[test]
fn fixture_valid_small_case_loads() {
    let (_dir, path) = write_fixture(
        "valid.safetensors",
        small_case(),
        &[("scale", "0.5"), ("causal", "top_left"), ("layout", "BHSD")],
    );
    let fixture = Fixture::load(&path).unwrap();
    assert_eq!(fixture.problem.scale(), 0.5);
    assert_eq!(fixture.problem.causal, wgpu_attention::Causal::TopLeft);
}

/// Returns the small case's tensors as raw bytes, with q, k and v in `input` and `out` in F32.
fn small_case_raw(
    input: safetensors::Dtype,
) -> Vec<(&'static str, Vec<usize>, Vec<u8>, safetensors::Dtype)> {
    let dims = vec![1, 1, 2, 4];
    // 8 elements of bitsize / 8 bytes each.
    let zeros_of = |dtype: safetensors::Dtype| vec![0u8; 8 * dtype.bitsize() / 8];
    vec![
        ("q", dims.clone(), zeros_of(input), input),
        ("k", dims.clone(), zeros_of(input), input),
        ("v", dims.clone(), zeros_of(input), input),
        (
            "out",
            dims,
            zeros_of(safetensors::Dtype::F32),
            safetensors::Dtype::F32,
        ),
    ]
}

#[test]
fn fixture_dtype_comes_from_tensors() {
    use safetensors::Dtype;
    let base = [("scale", "0.5"), ("causal", "none")];
    // F16 tensors without `input_dtype` are f16 inputs.
    let (_dir, path) = write_raw("f16.safetensors", small_case_raw(Dtype::F16), &base);
    assert!(Fixture::load(&path).unwrap().f16_inputs);
    let (_dir, path) = write_raw("f32.safetensors", small_case_raw(Dtype::F32), &base);
    assert!(!Fixture::load(&path).unwrap().f16_inputs);

    // A stated dtype must match the tensors.
    let stated = [("scale", "0.5"), ("causal", "none"), ("input_dtype", "f16")];
    let (_dir, path) = write_raw(
        "mislabelled.safetensors",
        small_case_raw(Dtype::F32),
        &stated,
    );
    let error = Fixture::load(&path).unwrap_err().to_string();
    assert!(
        error.contains("`input_dtype` is `f16` but tensors q, k and v are F32"),
        "{error}"
    );
    let unknown = [
        ("scale", "0.5"),
        ("causal", "none"),
        ("input_dtype", "float16"),
    ];
    let (_dir, path) = write_raw("float16.safetensors", small_case_raw(Dtype::F16), &unknown);
    let error = Fixture::load(&path).unwrap_err().to_string();
    assert!(error.contains("set it to `f16`"), "{error}");

    // q, k and v share one dtype.
    let mut mixed = small_case_raw(Dtype::F32);
    mixed[0] = ("q", vec![1, 1, 2, 4], vec![0u8; 16], Dtype::F16);
    let (_dir, path) = write_raw("mixed.safetensors", mixed, &base);
    let error = Fixture::load(&path).unwrap_err().to_string();
    assert!(error.contains("dtypes F16, F32 and F32"), "{error}");
}

#[test]
fn fixture_warns_of_ignored_names() {
    let mut tensors = small_case();
    tensors.push(("attn_mask", vec![1, 1, 2, 2], zeros(4)));
    let metadata = [
        ("scale", "0.5"),
        ("causal", "none"),
        ("soft_cap", "30"),
        ("source", "test"),
    ];
    let (_dir, path) = write_fixture("ignored.safetensors", tensors, &metadata);
    let fixture = Fixture::load(&path).unwrap();
    assert_eq!(fixture.warnings.len(), 2, "{:?}", fixture.warnings);
    assert!(
        fixture.warnings[0].contains("tensor `attn_mask`"),
        "{:?}",
        fixture.warnings
    );
    assert!(
        fixture.warnings[1].contains("`soft_cap`"),
        "{:?}",
        fixture.warnings
    );
    assert!(
        fixture.warnings[1].contains("`softcap`"),
        "{:?}",
        fixture.warnings
    );
    assert_eq!(fixture.problem.softcap, None);
}

#[test]
fn fixture_without_out_loads() {
    let mut tensors = small_case();
    tensors.retain(|(name, _, _)| *name != "out");
    let (_dir, path) = write_fixture(
        "inputs-only.safetensors",
        tensors,
        &[("scale", "0.5"), ("causal", "none")],
    );
    let fixture = Fixture::load(&path).unwrap();
    assert!(fixture.out.is_none());
    assert!(fixture.warnings.is_empty(), "{:?}", fixture.warnings);
}

#[test]
fn fixture_scale_errors_name_value() {
    for (scale, expected) in [
        ("1/sqrt(8)", "`scale` = 1/sqrt(8) is not a number"),
        ("NaN", "`scale` = NaN is not a finite f32"),
        ("1e39", "`scale` = 1e39 is not a finite f32"),
    ] {
        assert_load_fails(
            "scale.safetensors",
            small_case(),
            &[("scale", scale), ("causal", "none")],
            expected,
        );
    }
}

#[test]
fn fixture_not_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.safetensors");
    std::fs::write(&path, b"this is not a tensor file").unwrap();
    let error = Fixture::load(&path).unwrap_err();
    assert!(matches!(error, Error::Fixture { .. }), "{error}");
    assert!(
        error.to_string().contains("not a safetensors file"),
        "{error}"
    );
}

#[test]
fn fixture_missing_file() {
    let error = Fixture::load("/nonexistent/case.safetensors").unwrap_err();
    assert!(matches!(error, Error::Io { .. }), "{error}");
}

#[test]
fn fixture_unsupported_options_are_named() {
    let base = [("scale", "0.5"), ("causal", "none")];
    let mut metadata = base.to_vec();
    metadata.push(("window_align", "top_left"));
    assert_load_fails(
        "window-align.safetensors",
        small_case(),
        &metadata,
        "unsupported `window_align` = top_left",
    );
}

#[test]
fn fixture_variant_tensors_load_and_are_checked() {
    let base = [("scale", "0.5"), ("causal", "none")];
    let mut tensors = small_case();
    tensors.push(("sinks", vec![1], vec![0.5]));
    tensors.push(("alibi_slopes", vec![1], vec![0.25]));
    tensors.push(("kv_seq_lens", vec![1], vec![1.0]));
    let (_dir, path) = write_fixture("variants.safetensors", tensors, &base);
    let fixture = Fixture::load(&path).unwrap();
    assert_eq!(fixture.tensors.sinks.as_deref(), Some(&[0.5f32][..]));
    assert_eq!(
        fixture.tensors.alibi_slopes.as_deref(),
        Some(&[0.25f32][..])
    );
    assert_eq!(fixture.tensors.kv_seq_lens.as_deref(), Some(&[1u32][..]));
    let inputs = fixture.inputs();
    assert!(inputs.sinks.is_some());
    assert!(inputs.alibi_slopes.is_some());

    for (tensor, dims, data, expected) in [
        (
            "sinks",
            vec![2],
            vec![0.0, 0.0],
            "tensor `sinks` has shape [2]; expected [1]",
        ),
        (
            "kv_seq_lens",
            vec![1],
            vec![-1.0],
            "tensor `kv_seq_lens` holds -1; lengths must be at least 0",
        ),
        (
            "kv_seq_lens",
            vec![1],
            vec![3.0],
            "kv_seq_lens[0] = 3 is invalid: it is over seq_kv = 2",
        ),
    ] {
        let mut tensors = small_case();
        tensors.push((tensor, dims, data));
        assert_load_fails(
            &format!("bad-{tensor}.safetensors"),
            tensors,
            &base,
            expected,
        );
    }
}

#[test]
fn fixture_softcap_and_window_load() {
    let metadata = [
        ("scale", "0.5"),
        ("causal", "bottom_right"),
        ("softcap", "30"),
        ("window_left", "128"),
        ("window_right", "0"),
        ("window_align", "bottom_right"),
    ];
    let (_dir, path) = write_fixture("softcap-window.safetensors", small_case(), &metadata);
    let fixture = Fixture::load(&path).unwrap();
    assert_eq!(fixture.problem.softcap, Some(30.0));
    assert_eq!(fixture.problem.window.left, Some(128));
    assert_eq!(fixture.problem.window.right, Some(0));
}

#[test]
fn fixture_bad_softcap_or_window() {
    for (key, value, expected) in [
        ("softcap", "abc", "metadata `softcap` = abc is not a number"),
        ("softcap", "-2", "softcap = -2 is invalid"),
        (
            "window_left",
            "-1",
            "metadata `window_left` = -1 is not a non-negative integer",
        ),
    ] {
        let metadata = [("scale", "0.5"), ("causal", "none"), (key, value)];
        let name = format!("bad-{key}-{value}.safetensors");
        assert_load_fails(&name, small_case(), &metadata, expected);
    }
}

#[test]
fn softcap_and_window_validation() {
    let shape = AttentionShape::new(1, 1, 2, 2, 4);
    // 1e300 rounds to an infinite f32 and 1e-300 to 0, and 1e-39 is subnormal in f32.
    for softcap in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300, 1e-300, 1e-39] {
        let error = AttentionProblem::new(shape)
            .with_softcap(softcap)
            .validate()
            .unwrap_err();
        assert!(
            matches!(error, Error::InvalidSoftcap { .. }),
            "{softcap}: {error}"
        );
    }
    let error = AttentionProblem::new(shape)
        .with_window(Some(usize::MAX), None)
        .validate()
        .unwrap_err();
    assert!(
        matches!(error, Error::InvalidWindow { side: "left", .. }),
        "{error}"
    );
}

#[test]
fn fixture_missing_key_or_tensor() {
    assert_load_fails(
        "no-scale.safetensors",
        small_case(),
        &[("causal", "none")],
        "metadata key `scale` is missing; store the softmax scale the expected output was \
         computed with, as a decimal, such as 0.5 for 1/sqrt(4)",
    );
    assert_load_fails(
        "no-causal.safetensors",
        small_case(),
        &[("scale", "1")],
        "metadata key `causal` is missing; store none, top_left or bottom_right",
    );

    let mut tensors = small_case();
    tensors.retain(|(name, _, _)| *name != "v");
    assert_load_fails(
        "no-v.safetensors",
        tensors,
        &[("scale", "1"), ("causal", "none")],
        "tensor `v` is missing",
    );
}

#[test]
fn fixture_bad_values() {
    assert_load_fails(
        "bad-causal.safetensors",
        small_case(),
        &[("scale", "1"), ("causal", "sideways")],
        "`causal` = sideways",
    );

    let mut tensors = small_case();
    tensors[3].1 = vec![1, 1, 2, 3];
    tensors[3].2 = zeros(6);
    assert_load_fails(
        "bad-out.safetensors",
        tensors,
        &[("scale", "1"), ("causal", "none")],
        "tensor `out` has shape [1, 1, 2, 3]",
    );

    let mut tensors = small_case();
    tensors[2].1 = vec![1, 1, 2, 6];
    tensors[2].2 = zeros(12);
    assert_load_fails(
        "value-dim.safetensors",
        tensors,
        &[("scale", "1"), ("causal", "none")],
        "tensor `out` has shape [1, 1, 2, 4]; expected [1, 1, 2, 6]",
    );
}

#[test]
fn packed_offsets_must_match_the_problem() {
    // Two sequences of 3 rows: as long packed as dense, so only the offsets differ.
    let shape = AttentionShape::new(2, 1, 3, 3, 8);
    let (q, kv) = (zeros(6 * 8), zeros(6 * 8));
    let (cu_q, cu_kv) = ([0u32, 2, 6], [0u32, 3, 6]);
    // Offsets without with_packed, and with_packed without offsets.
    let dense = AttentionProblem::new(shape);
    let inputs = AttentionInputs::new(&q, &kv, &kv).with_cu_seqlens(&cu_q, &cu_kv);
    let error = run(&dense, &inputs);
    assert!(matches!(error, Error::PackedMismatch(_)), "{error}");
    assert!(error.to_string().contains("with_packed"), "{error}");
    let packed = dense.with_packed(6, 6);
    let error = run(&packed, &AttentionInputs::new(&q, &kv, &kv));
    assert!(matches!(error, Error::PackedMismatch(_)), "{error}");
    assert!(error.to_string().contains("cu_seqlens_q"), "{error}");
}

#[test]
fn packed_offsets_out_of_range() {
    let shape = AttentionShape::new(2, 1, 4, 4, 8);
    let problem = AttentionProblem::new(shape).with_packed(6, 6);
    let (q, kv) = (zeros(6 * 8), zeros(6 * 8));
    let good = [0u32, 3, 6];
    for (offsets, expected) in [
        (
            [0u32, 4, 3],
            "cu_seqlens_q[1] = 4 is invalid: it is above the next offset 3",
        ),
        (
            [0u32, 1, 6],
            "cu_seqlens_q[2] = 6 is invalid: it ends sequence 1 after 5 rows, longer than the \
             shape's longest sequence, 4",
        ),
        (
            [0u32, 3, 7],
            "cu_seqlens_q[2] = 7 is invalid: it is past the 6 packed rows",
        ),
    ] {
        let inputs = AttentionInputs::new(&q, &kv, &kv).with_cu_seqlens(&offsets, &good);
        let error = run(&problem, &inputs);
        assert!(matches!(error, Error::InvalidLengths { .. }), "{error}");
        assert!(error.to_string().contains(expected), "{error}");
    }
    let short = [0u32, 3];
    let inputs = AttentionInputs::new(&q, &kv, &kv).with_cu_seqlens(&good, &short);
    let error = run(&problem, &inputs);
    assert!(
        matches!(
            error,
            Error::LengthMismatch {
                tensor: "cu_seqlens_kv",
                expected: 3,
                actual: 2,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn per_head_and_per_sequence_lengths() {
    let shape = AttentionShape::new(2, 4, 3, 5, 8).with_kv_heads(2);
    let problem = AttentionProblem::new(shape);
    let (q, kv) = (zeros(shape.q_len()), zeros(shape.k_len()));
    let base = AttentionInputs::new(&q, &kv, &kv);
    let three = [0.0f32; 3];
    for (tensor, inputs) in [
        ("alibi_slopes", base.with_alibi_slopes(&three)),
        ("sinks", base.with_sinks(&three)),
    ] {
        let error = run(&problem, &inputs);
        assert!(
            matches!(error, Error::LengthMismatch { tensor: t, expected: 4, actual: 3, .. } if t == tensor),
            "{error}"
        );
    }
    let error = run(&problem, &base.with_kv_seq_lens(&[5]));
    assert!(
        matches!(
            error,
            Error::LengthMismatch {
                tensor: "kv_seq_lens",
                expected: 2,
                ..
            }
        ),
        "{error}"
    );
    let error = run(&problem, &base.with_kv_seq_lens(&[5, 6]));
    assert!(
        error
            .to_string()
            .contains("kv_seq_lens[1] = 6 is invalid: it is over seq_kv = 5"),
        "{error}"
    );
}

#[test]
fn strided_layouts_are_checked() {
    use wgpu_attention::{Layout, Strides, TensorStrides};
    let shape = AttentionShape::new(1, 2, 3, 3, 4);
    let dense = Strides {
        batch: 24,
        head: 12,
        seq: 4,
    };
    // Two heads written to the same place.
    let overlapping = TensorStrides {
        q: dense,
        k: dense,
        v: dense,
        out: Strides { head: 0, ..dense },
    };
    let problem = AttentionProblem::new(shape).with_layout(Layout::Strided(overlapping));
    let error = problem.validate().unwrap_err();
    assert!(
        matches!(error, Error::OverlappingStrides { tensor: "out", .. }),
        "{error}"
    );

    // A strided view may be longer than it addresses, never shorter.
    let strides = TensorStrides {
        q: dense,
        k: dense,
        v: dense,
        out: dense,
    };
    let problem = AttentionProblem::new(shape).with_layout(Layout::Strided(strides));
    let (long, short) = (zeros(30), zeros(23));
    let ok = reference::attention(&problem, &AttentionInputs::new(&long, &long, &long));
    assert!(ok.is_ok(), "{ok:?}");
    let error = run(&problem, &AttentionInputs::new(&short, &long, &long));
    assert!(
        matches!(
            error,
            Error::LengthMismatch {
                tensor: "q",
                expected: 24,
                actual: 23,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn value_head_dim_over_maximum() {
    let shape = AttentionShape::new(1, 1, 2, 2, 4).with_head_dim_v(1000);
    let error = AttentionProblem::new(shape).validate().unwrap_err();
    assert!(
        matches!(
            error,
            Error::HeadDimTooLarge {
                name: "head_dim_v",
                head_dim: 1000,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().starts_with("head_dim_v = 1000"),
        "{error}"
    );
}

#[test]
fn overflowing_sizes_are_rejected() {
    use wgpu_attention::{Layout, Strides};
    // Element counts past usize: no slice can hold them, and no product may wrap.
    let huge = AttentionProblem::new(AttentionShape::new(1 << 33, 1 << 31, 1, 1, 1));
    let error = run(&huge, &AttentionInputs::new(&[], &[], &[]));
    assert!(matches!(error, Error::SizeOverflow { .. }), "{error}");

    let shape = AttentionShape::new(3, 1, 1, 1, 4);
    let problem = AttentionProblem::new(shape);
    let mut strides = problem.strides();
    strides.q = Strides {
        batch: usize::MAX / 2,
        head: 0,
        seq: 0,
    };
    let strided = problem.with_layout(Layout::Strided(strides));
    let data = zeros(12);
    let error = run(&strided, &AttentionInputs::new(&data, &data, &data));
    assert!(matches!(error, Error::SizeOverflow { .. }), "{error}");
    assert!(error.to_string().contains("tensor `q`"), "{error}");
}

#[test]
fn reference_row_out_of_range() {
    let shape = AttentionShape::new(2, 3, 4, 5, 8);
    let problem = AttentionProblem::new(shape);
    let (q, kv) = (zeros(shape.q_len()), zeros(shape.k_len()));
    let inputs = AttentionInputs::new(&q, &kv, &kv);
    for (b, h, i) in [(2, 0, 0), (0, 3, 0), (0, 0, 4)] {
        let error = reference::attention_row(&problem, &inputs, b, h, i).unwrap_err();
        assert!(
            matches!(error, Error::RowOutOfRange { b: eb, h: eh, i: ei, .. } if (eb, eh, ei) == (b, h, i)),
            "{error}"
        );
    }
    assert!(reference::attention_row(&problem, &inputs, 1, 2, 3).is_ok());
}

#[test]
fn cache_key_lengths_need_lengths() {
    use wgpu_attention::wgpu::util::DeviceExt;
    use wgpu_attention::{GpuTensors, KeyLengths};
    let shape = AttentionShape::new(2, 2, 1, 16, 8);
    let problem = AttentionProblem::new(shape).with_key_lengths(KeyLengths::Cache);
    let (q, kv) = (zeros(shape.q_len()), zeros(shape.k_len()));
    let error = run(&problem, &AttentionInputs::new(&q, &kv, &kv));
    assert!(matches!(error, Error::MissingKeyLengths), "{error}");
    assert!(error.to_string().contains("with_kv_seq_lens"), "{error}");

    // The same on the caller's buffers, where the lengths may be anywhere on the GPU.
    let context = common::context();
    let buffer = |data: &[f32]| {
        context
            .device()
            .create_buffer_init(&wgpu_attention::wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(data),
                usage: wgpu_attention::wgpu::BufferUsages::STORAGE,
            })
    };
    let (q, kv, out) = (buffer(&q), buffer(&kv), buffer(&q));
    let tensors = GpuTensors::new(&q, &kv, &kv, &out);
    let error = context
        .prepare(Kernel::Flash, &problem, &tensors)
        .unwrap_err();
    assert!(matches!(error, Error::MissingKeyLengths), "{error}");
    // With lengths, the same call is accepted.
    let lens =
        context
            .device()
            .create_buffer_init(&wgpu_attention::wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(&[3u32, 16]),
                usage: wgpu_attention::wgpu::BufferUsages::COPY_SRC,
            });
    context
        .prepare(Kernel::Flash, &problem, &tensors.with_kv_seq_lens(&lens))
        .unwrap();
}
