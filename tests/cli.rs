//! The `wgpu-attention` command line, run as a user would.

#![cfg(feature = "cli")]

use std::path::PathBuf;
use std::process::Command;

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wgpu-attention"))
}

fn fixtures() -> Vec<PathBuf> {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    (0..6)
        .map(|layer| data.join(format!("minilm_layer{layer}.safetensors")))
        .collect()
}

/// Creates an empty directory that is removed when the returned value drops.
fn scratch_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("wgpu-attention-cli-{name}-"))
        .tempdir()
        .unwrap()
}

#[test]
fn check_passes_minilm_fixtures() {
    let output = binary().arg("check").args(fixtures()).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.matches("PASS ").count(), 6, "{stdout}");
    assert!(stdout.contains("6 passed, 0 failed"), "{stdout}");
}

#[test]
fn check_json_has_one_object_per_file() {
    let output = binary()
        .args(["check", "--json", "--kernel", "three-stage"])
        .args(fixtures())
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let objects: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(objects.len(), 6);
    for object in &objects {
        assert_eq!(object["status"], "pass", "{object}");
        assert_eq!(object["kernel"], "three-stage", "{object}");
        assert!(
            object["gpu_vs_expected"]["max_abs"].as_f64().unwrap() < 1e-5,
            "{object}"
        );
        assert!(object["lse_vs_expected"]["nmse"].is_number(), "{object}");
    }
}

#[test]
fn check_save_writes_outputs() {
    let dir = scratch_dir("save");
    let files = &fixtures()[..2];
    let output = binary()
        .arg("check")
        .arg("--save")
        .arg(dir.path())
        .args(files)
        .output()
        .unwrap();
    assert!(output.status.success());
    for layer in 0..2 {
        let bytes =
            std::fs::read(dir.path().join(format!("minilm_layer{layer}.safetensors"))).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(tensors.tensor("out").unwrap().shape(), &[2, 12, 9, 32]);
        assert_eq!(tensors.tensor("lse").unwrap().shape(), &[2, 12, 9]);
    }
}

/// Writes a copy of the first MiniLM fixture whose tensor `tensor` has `shift` added to its first
/// element. Returns the file's directory, which must outlive the file's use, and its path.
fn fixture_with_shifted(name: &str, tensor: &str, shift: f32) -> (tempfile::TempDir, PathBuf) {
    let bytes = std::fs::read(&fixtures()[0]).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data().to_vec();
            (name, view.dtype(), view.shape().to_vec(), data)
        })
        .collect();
    let data = &mut owned
        .iter_mut()
        .find(|(name, ..)| name == tensor)
        .unwrap()
        .3;
    let first = f32::from_le_bytes(data[..4].try_into().unwrap()) + shift;
    data[..4].copy_from_slice(&first.to_le_bytes());
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(name, dtype, dims, data)| {
            let view = safetensors::tensor::TensorView::new(*dtype, dims.clone(), data);
            (name.as_str(), view.unwrap())
        })
        .collect();
    let dir = scratch_dir(name);
    let path = dir.path().join("shifted.safetensors");
    let file = safetensors::serialize(views, metadata.metadata().clone()).unwrap();
    std::fs::write(&path, file).unwrap();
    (dir, path)
}

#[test]
fn check_reference_alone_judges_the_files() {
    let output = binary()
        .args(["check", "--json", "--kernel", "reference"])
        .args(fixtures())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    for line in stdout.lines() {
        let object: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(object["status"], "pass", "{object}");
        assert_eq!(object["kernel"], "reference", "{object}");
        assert!(object["adapter"].is_null(), "{object}");
        assert!(object["gpu_vs_expected"].is_null(), "{object}");
        assert!(
            object["reference_vs_expected"]["max_abs"].as_f64().unwrap() < 1e-5,
            "{object}"
        );
    }
    assert_eq!(stdout.lines().count(), 6, "{stdout}");

    // An expected output off by 1e-3 in one element fails the f32 tolerance.
    let (_dir, shifted) = fixture_with_shifted("reference-shifted", "out", 1e-3);
    let output = binary()
        .args(["check", "--kernel", "reference"])
        .arg(&shifted)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(
        stdout.contains("FAIL ") && stdout.contains("0 passed, 1 failed"),
        "{stdout}"
    );
    // The failing comparison is marked, and the tolerance it broke is stated.
    let marked: Vec<&str> = stdout
        .lines()
        .filter(|line| line.ends_with("<- over the tolerance"))
        .collect();
    assert_eq!(marked.len(), 1, "{stdout}");
    assert!(marked[0].contains("reference vs expected"), "{stdout}");
    assert!(stdout.contains("f32 tolerance: "), "{stdout}");
    // The shifted element is the first of batch element 0, head 0.
    assert!(
        stdout.contains("largest finite error at [0, 0, 0, 0] (batch, head, row, col)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 of 6912 elements over the limit (b0 h0: 1)"),
        "{stdout}"
    );
    let output = binary()
        .args(["check", "--json", "--kernel", "reference"])
        .arg(&shifted)
        .output()
        .unwrap();
    let object: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim()).unwrap();
    assert_eq!(
        object["failed"],
        serde_json::json!(["reference_vs_expected"])
    );
    let comparison = &object["reference_vs_expected"];
    assert_eq!(
        comparison["worst"]["index"],
        serde_json::json!([0, 0, 0, 0])
    );
    assert_eq!(
        comparison["over_limit_by_head"],
        serde_json::json!([{"batch": 0, "head": 0, "count": 1}])
    );
    // The limit scales with the largest expected magnitude, 2.75 in this file.
    let max_expected = comparison["max_expected"].as_f64().unwrap();
    assert!(max_expected > 1.0, "{comparison}");
    assert_eq!(
        comparison["limits"]["max_abs"].as_f64().unwrap(),
        1e-5 * max_expected,
        "{comparison}"
    );

    // Probabilities off by 1e-3 in one element fail too, on the GPU path as well.
    let (_dir, shifted) = fixture_with_shifted("probs-shifted", "probs", 1e-3);
    let output = binary()
        .args(["check", "--json"])
        .arg(&shifted)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let object: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim()).unwrap();
    assert_eq!(object["failed"], serde_json::json!(["probs_vs_expected"]));
}

#[test]
fn check_save_never_overwrites_inputs() {
    let dir = scratch_dir("save-inputs");
    let input = dir.path().join("minilm_layer0.safetensors");
    std::fs::copy(&fixtures()[0], &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let output = binary()
        .arg("check")
        .arg("--save")
        .arg(dir.path())
        .arg(&input)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("would overwrite the input file"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&input).unwrap(), before);

    // Two inputs with one file name would share an output file.
    let output = binary()
        .arg("check")
        .arg("--save")
        .arg(dir.path().join("out"))
        .arg(&input)
        .arg(&fixtures()[0])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("would both be saved as"), "{stderr}");
}

#[test]
fn check_save_names_uncreatable_directory() {
    let dir = scratch_dir("save-uncreatable");
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let target = file.join("out");
    let output = binary()
        .arg("check")
        .arg("--save")
        .arg(&target)
        .arg(&fixtures()[0])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("--save {}", target.display())),
        "{stderr}"
    );
    assert!(stderr.contains("creating the directory failed"), "{stderr}");
}

#[test]
fn check_reports_malformed_file_and_fails() {
    let dir = scratch_dir("malformed");
    let bad = dir.path().join("broken.safetensors");
    std::fs::write(&bad, b"not safetensors").unwrap();
    let output = binary()
        .arg("check")
        .arg(&bad)
        .arg(&fixtures()[0])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(
        stdout.contains("ERROR") && stdout.contains("not a safetensors file"),
        "{stdout}"
    );
    assert!(stdout.contains("1 passed, 0 failed, 1 error"), "{stdout}");
}

#[test]
fn check_unknown_kernel_is_rejected() {
    let output = binary()
        .args(["check", "--kernel", "fastest"])
        .arg(&fixtures()[0])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown kernel `fastest`"), "{stderr}");

    let output = binary()
        .args(["check", "--kernel", "flash,three-stage"])
        .arg(&fixtures()[0])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("run check once per kernel"), "{stderr}");
}

#[test]
fn closed_output_pipe_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = binary()
        .args(["validate", "--list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line, as `head -1` would, then close the pipe.
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("flash"), "{first}");
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn info_notes_unmatched_adapter_variable() {
    let output = binary()
        .args(["info", "--json"])
        .env(wgpu_attention::ADAPTER_ENV, "no-such-adapter")
        .output()
        .unwrap();
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("WGPU_ATTENTION_ADAPTER=`no-such-adapter` matches no adapter"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines() {
        let adapter: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(adapter["default"], false, "{adapter}");
    }
}

#[test]
fn info_lists_an_adapter() {
    let output = binary().args(["info", "--json"]).output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Every adapter names its driver, OpenGL ones included, whose backend reports no name.
    let mut defaults = 0;
    for line in stdout.lines() {
        let adapter: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(!adapter["driver"].as_str().unwrap().is_empty(), "{adapter}");
        assert!(
            adapter["timestamp_query_inside_encoders"].is_boolean(),
            "{adapter}"
        );
        // Subgroup sizes are given only where the adapter has subgroups.
        let has_subgroups = adapter["subgroups"].as_bool().unwrap();
        assert_eq!(
            adapter["subgroup_min_size"].is_u64(),
            has_subgroups,
            "{adapter}"
        );
        assert_eq!(
            adapter["subgroup_max_size"].is_u64(),
            has_subgroups,
            "{adapter}"
        );
        if adapter["default"].as_bool().unwrap() {
            defaults += 1;
        }
    }
    // One adapter is the one the other commands open without --adapter.
    assert_eq!(defaults, 1, "{stdout}");
    let first: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert!(first["name"].is_string(), "{first}");
    assert!(
        first["limits"]["max_storage_buffer_binding_size"]
            .as_u64()
            .unwrap()
            > 0,
        "{first}"
    );
}

#[test]
fn check_runs_f16_fixture() {
    use wgpu_attention::{AttentionInputs, AttentionProblem, AttentionShape, f16, reference};
    // Inputs stored as F16 with `input_dtype` = f16; the expected output is the f64 reference
    // on the same f16 values.
    let shape = AttentionShape::new(1, 2, 5, 7, 8);
    let problem = AttentionProblem::new(shape).with_scale(0.3);
    let values = |len: usize, offset: usize| -> Vec<f16> {
        (0..len)
            .map(|i| f16::from_f32((((i + offset) * 37) % 17) as f32 / 8.0 - 1.0))
            .collect()
    };
    let (q, k, v) = (
        values(shape.q_len(), 0),
        values(shape.k_len(), 5),
        values(shape.v_len(), 11),
    );
    let widen = |x: &[f16]| x.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    let (q32, k32, v32) = (widen(&q), widen(&k), widen(&v));
    let inputs = AttentionInputs::new(&q32, &k32, &v32);
    let expected = reference::attention(&problem, &inputs).unwrap().out_f32();

    let half_bytes = |x: &[f16]| x.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let out_bytes: Vec<u8> = expected.iter().flat_map(|x| x.to_le_bytes()).collect();
    let (qb, kb, vb) = (half_bytes(&q), half_bytes(&k), half_bytes(&v));
    fn view(
        dtype: safetensors::Dtype,
        dims: Vec<usize>,
        data: &[u8],
    ) -> safetensors::tensor::TensorView<'_> {
        safetensors::tensor::TensorView::new(dtype, dims, data).unwrap()
    }
    let tensors = vec![
        ("q", view(safetensors::Dtype::F16, vec![1, 2, 5, 8], &qb)),
        ("k", view(safetensors::Dtype::F16, vec![1, 2, 7, 8], &kb)),
        ("v", view(safetensors::Dtype::F16, vec![1, 2, 7, 8], &vb)),
        (
            "out",
            view(safetensors::Dtype::F32, vec![1, 2, 5, 8], &out_bytes),
        ),
    ];
    let metadata = std::collections::HashMap::from([
        ("scale".to_string(), "0.3".to_string()),
        ("causal".to_string(), "none".to_string()),
        ("layout".to_string(), "BHSD".to_string()),
        ("input_dtype".to_string(), "f16".to_string()),
    ]);
    let dir = scratch_dir("f16");
    let path = dir.path().join("half.safetensors");
    std::fs::write(
        &path,
        safetensors::serialize(tensors, Some(metadata)).unwrap(),
    )
    .unwrap();

    for kernel in ["flash", "three-stage"] {
        let output = binary()
            .args(["check", "--json", "--kernel", kernel])
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{kernel}: {stdout}");
        let object: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(object["status"], "pass", "{object}");
        assert_eq!(object["tolerance"]["nmse"], 5e-4, "{object}");
    }
}

/// The fixture format's formula for `out`, written out directly for the variant tensors: scores,
/// ALiBi bias, key lengths, then a softmax whose denominator includes the sink.
#[allow(clippy::too_many_arguments)]
fn variant_expected(
    dims: [usize; 6],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f64,
    slopes: &[f32],
    sinks: &[f32],
    lens: &[i32],
) -> Vec<f32> {
    let [batch, heads, seq_q, seq_kv, dk, dv] = dims;
    let mut out = Vec::new();
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..seq_q {
                let q_row = &q[((b * heads + h) * seq_q + i) * dk..][..dk];
                let mut weights = Vec::new();
                for j in 0..seq_kv.min(lens[b] as usize) {
                    let k_row = &k[((b * heads + h) * seq_kv + j) * dk..][..dk];
                    let dot: f64 = q_row
                        .iter()
                        .zip(k_row)
                        .map(|(&a, &c)| f64::from(a * c))
                        .sum();
                    let distance = (j as f64 - (i + seq_kv - seq_q) as f64).abs();
                    weights.push((j, scale * dot - f64::from(slopes[h]) * distance));
                }
                let denominator: f64 =
                    f64::from(sinks[h]).exp() + weights.iter().map(|&(_, s)| s.exp()).sum::<f64>();
                for c in 0..dv {
                    let sum: f64 = weights
                        .iter()
                        .map(|&(j, s)| {
                            s.exp() / denominator
                                * f64::from(v[((b * heads + h) * seq_kv + j) * dv + c])
                        })
                        .sum();
                    out.push(sum as f32);
                }
            }
        }
    }
    out
}

#[test]
fn check_reads_variant_tensors() {
    let dims = [2, 2, 3, 4, 3, 2];
    let [batch, heads, seq_q, seq_kv, dk, dv] = dims;
    let values = |len: usize, offset: usize| -> Vec<f32> {
        (0..len)
            .map(|i| (((i + offset) * 37) % 17) as f32 / 8.0 - 1.0)
            .collect()
    };
    let q = values(batch * heads * seq_q * dk, 0);
    let k = values(batch * heads * seq_kv * dk, 5);
    let v = values(batch * heads * seq_kv * dv, 11);
    let (slopes, sinks, lens) = ([0.5f32, 0.125], [0.25f32, -1.0], [4i32, 2]);
    let out = variant_expected(dims, &q, &k, &v, 0.7, &slopes, &sinks, &lens);
    // The same file with `out` computed without the sinks must fail, or the sinks went unread.
    let no_sinks = variant_expected(
        dims,
        &q,
        &k,
        &v,
        0.7,
        &slopes,
        &[f32::NEG_INFINITY; 2],
        &lens,
    );

    let dir = scratch_dir("variants");
    for (name, expected, passes) in [("variants", &out, true), ("no-sinks", &no_sinks, false)] {
        let bytes = |x: &[f32]| x.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let lens_bytes: Vec<u8> = lens.iter().flat_map(|x| x.to_le_bytes()).collect();
        let data = [
            ("q", vec![batch, heads, seq_q, dk], bytes(&q)),
            ("k", vec![batch, heads, seq_kv, dk], bytes(&k)),
            ("v", vec![batch, heads, seq_kv, dv], bytes(&v)),
            ("out", vec![batch, heads, seq_q, dv], bytes(expected)),
            ("alibi_slopes", vec![heads], bytes(&slopes)),
            ("sinks", vec![heads], bytes(&sinks)),
        ];
        let mut tensors: Vec<(&str, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(name, shape, data)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    data,
                );
                (*name, view.unwrap())
            })
            .collect();
        let lens_view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![batch], &lens_bytes);
        tensors.push(("kv_seq_lens", lens_view.unwrap()));
        let metadata = std::collections::HashMap::from([
            ("scale".to_string(), "0.7".to_string()),
            ("causal".to_string(), "none".to_string()),
            ("layout".to_string(), "BHSD".to_string()),
        ]);
        let path = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(
            &path,
            safetensors::serialize(tensors, Some(metadata)).unwrap(),
        )
        .unwrap();
        for kernel in [
            "flash-tiled",
            "flash-rows",
            "flash-decode",
            "flash-subgroup",
            "three-stage",
        ] {
            let output = binary()
                .args(["check", "--json", "--kernel", kernel])
                .arg(&path)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert_eq!(output.status.success(), passes, "{name} {kernel}: {stdout}");
            let object: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
            let status = if passes { "pass" } else { "fail" };
            assert_eq!(object["status"], status, "{name} {kernel}: {object}");
        }
    }
}

#[test]
fn unknown_adapter_names_where_it_came_from() {
    let output = binary()
        .args(["check", "--adapter", "no-such-adapter"])
        .arg(&fixtures()[0])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("requested by --adapter"), "{stderr}");

    let output = binary()
        .arg("check")
        .arg(&fixtures()[0])
        .env(wgpu_attention::ADAPTER_ENV, "no-such-adapter")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("requested by the environment variable WGPU_ATTENTION_ADAPTER"),
        "{stderr}"
    );
}

/// Writes a BHSD f32 fixture of `problem` with `data`'s Q, K and V and, when given, the output.
fn write_f32_fixture(
    path: &std::path::Path,
    problem: &wgpu_attention::AttentionProblem,
    data: &wgpu_attention::OwnedInputs,
    out: Option<&[f32]>,
) {
    let s = &problem.shape;
    let bytes = |x: &[f32]| x.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut buffers = vec![bytes(&data.q), bytes(&data.k), bytes(&data.v)];
    buffers.extend(out.map(bytes));
    let dims = [
        vec![s.batch, s.heads, s.seq_q, s.head_dim],
        vec![s.batch, s.kv_heads, s.seq_kv, s.head_dim],
        vec![s.batch, s.kv_heads, s.seq_kv, s.head_dim_v],
        vec![s.batch, s.heads, s.seq_q, s.head_dim_v],
    ];
    let tensors: Vec<_> = ["q", "k", "v", "out"]
        .into_iter()
        .zip(&buffers)
        .zip(dims)
        .map(|((name, buffer), dims)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, dims, buffer);
            (name, view.unwrap())
        })
        .collect();
    let metadata = std::collections::HashMap::from([
        ("scale".to_string(), problem.scale().to_string()),
        ("causal".to_string(), "none".to_string()),
        ("layout".to_string(), "BHSD".to_string()),
    ]);
    std::fs::write(
        path,
        safetensors::serialize(tensors, Some(metadata)).unwrap(),
    )
    .unwrap();
}

#[test]
fn check_allows_score_rounding_at_large_scale() {
    use wgpu_attention::{AttentionProblem, AttentionShape, OwnedInputs, reference};
    // At scale 100 the three-stage output is off by more than the plain f32 tolerance, and all
    // of that error is score rounding. A file whose output used a scale 1 % larger still fails.
    let problem = AttentionProblem::new(AttentionShape::new(1, 2, 33, 257, 128)).with_scale(100.0);
    let data = OwnedInputs::random(&problem, 2);
    let dir = scratch_dir("large-scale");
    let right = dir.path().join("right.safetensors");
    let expected = reference::attention(&problem, &data.inputs()).unwrap();
    write_f32_fixture(&right, &problem, &data, Some(&expected.out_f32()));
    let wrong = dir.path().join("wrong.safetensors");
    let wrong_scale = problem.with_scale(101.0);
    let wrong_out = reference::attention(&wrong_scale, &data.inputs()).unwrap();
    write_f32_fixture(&wrong, &problem, &data, Some(&wrong_out.out_f32()));

    let output = binary()
        .args(["check", "--json", "--kernel", "three-stage"])
        .arg(&right)
        .arg(&wrong)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let reports: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(reports.len(), 2, "{stdout}");
    let gpu = &reports[0]["gpu_vs_reference"];
    assert_eq!(reports[0]["status"], "pass", "{}", reports[0]);
    assert!(gpu["max_abs"].as_f64().unwrap() > 1e-5, "{gpu}");
    assert!(gpu["max_abs_excess"].as_f64().unwrap() <= 1e-5, "{gpu}");
    assert_eq!(reports[1]["status"], "fail", "{}", reports[1]);
    assert_eq!(reports[1]["failed"][0], "gpu_vs_expected", "{}", reports[1]);
    assert!(!output.status.success());
}

#[test]
fn check_saves_reference_for_inputs_only() {
    use wgpu_attention::fixture::Fixture;
    use wgpu_attention::{AttentionProblem, AttentionShape, OwnedInputs, reference};
    // A file with Q, K and V only: nothing to compare, and --save writes the reference's output.
    let problem = AttentionProblem::new(AttentionShape::new(1, 2, 5, 7, 8)).with_scale(0.3);
    let data = OwnedInputs::random(&problem, 4);
    let dir = scratch_dir("inputs-only");
    let input = dir.path().join("inputs.safetensors");
    write_f32_fixture(&input, &problem, &data, None);
    let saved = dir.path().join("saved");
    let output = binary()
        .args(["check", "--kernel", "reference", "--save"])
        .arg(&saved)
        .arg(&input)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("the file has no `out`"), "{stdout}");

    // The saved output is the reference's, and checking it with the inputs passes on the GPU.
    let saved_bytes = std::fs::read(saved.join("inputs.safetensors")).unwrap();
    let saved_tensors = safetensors::SafeTensors::deserialize(&saved_bytes).unwrap();
    let out: Vec<f32> = saved_tensors
        .tensor("out")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|bytes| f32::from_le_bytes(bytes.try_into().unwrap()))
        .collect();
    let expected = reference::attention(&problem, &data.inputs()).unwrap();
    assert_eq!(out, expected.out_f32());
    let complete = dir.path().join("complete.safetensors");
    write_f32_fixture(&complete, &problem, &data, Some(&out));
    assert!(Fixture::load(&complete).unwrap().out.is_some());
    let output = binary().arg("check").arg(&complete).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn check_hints_command_line_fix_for_named_program() {
    use wgpu_attention::{AttentionProblem, AttentionShape, OwnedInputs};
    // The decoding program takes head dims up to 128, on every adapter.
    let problem = AttentionProblem::new(AttentionShape::new(1, 1, 2, 3, 160));
    let data = OwnedInputs::random(&problem, 5);
    let dir = scratch_dir("named-program");
    let input = dir.path().join("wide.safetensors");
    write_f32_fixture(&input, &problem, &data, None);
    let hint = "--kernel auto (the default) or flash picks a program this adapter runs";

    let output = binary()
        .args(["check", "--kernel", "flash-decode"])
        .arg(&input)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("ERROR"), "{stdout}");
    assert!(stdout.contains(hint), "{stdout}");

    let output = binary()
        .args(["check", "--kernel", "auto"])
        .arg(&input)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(!stdout.contains(hint), "{stdout}");
}

#[test]
fn check_marks_unjudged_comparison() {
    let output = binary().arg("check").arg(&fixtures()[0]).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    // With a GPU output, the reference's output against the file's is shown but not judged.
    let line = |label: &str| {
        stdout
            .lines()
            .find(|line| line.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no `{label}` line in {stdout}"))
            .to_string()
    };
    assert!(
        line("reference vs expected").ends_with("(not judged)"),
        "{stdout}"
    );
    assert!(!line("gpu vs reference").contains("not judged"), "{stdout}");
    assert!(!line("gpu vs expected").contains("not judged"), "{stdout}");
}
