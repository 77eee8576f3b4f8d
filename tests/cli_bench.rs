//! `wgpu-attention bench`, run as a user would, on small shapes so that it takes seconds.

#![cfg(feature = "cli")]

use std::process::{Command, Output};

/// Every field that `bench --json` writes on each line.
const JSON_FIELDS: [&str; 29] = [
    "case",
    "batch",
    "heads",
    "kv_heads",
    "seq_q",
    "seq_kv",
    "head_dim",
    "causal",
    "dtype",
    "kernel",
    "status",
    "median_ms",
    "min_ms",
    "max_ms",
    "gflops",
    "gbps",
    "first_call_ms",
    "runs",
    "min_runs",
    "min_time_s",
    "timing",
    "runs_on",
    "adapter",
    "vendor_id",
    "device_id",
    "backend",
    "driver",
    "driver_info",
    "crate_version",
];

/// Runs `wgpu-attention bench` with `args`, measuring each kernel once after its warm-up.
fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgpu-attention"))
        .arg("bench")
        .args(["--min-time", "0", "--min-runs", "1"])
        .args(args)
        .output()
        .unwrap()
}

/// Parses every line of stdout as a JSON object.
fn json_lines(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}")))
        .collect()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bench_json_reports_every_kernel() {
    let output = bench(&["--shape", "1,2,2,64,64,32", "--kernel", "all", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let rows = json_lines(&output);
    let kernels: Vec<&str> = rows
        .iter()
        .map(|row| row["kernel"].as_str().unwrap())
        .collect();
    // `flash` is reported as the fused program that ran for this adapter.
    assert!(
        matches!(
            kernels[0],
            "flash-decode" | "flash-subgroup" | "flash-tiled"
        ),
        "{kernels:?}"
    );
    assert_eq!(rows[0]["requested_kernel"], "flash");
    assert_eq!(kernels[1..], ["three-stage", "reference"]);
    for row in &rows {
        for field in JSON_FIELDS {
            assert!(row.get(field).is_some(), "missing `{field}` in {row}");
        }
        assert_eq!(row["case"], "b1_h2_hkv2_q64_kv64_d32", "{row}");
        assert_eq!(row["seq_kv"], 64, "{row}");
        assert_eq!(row["causal"], "none", "{row}");
        assert_eq!(row["dtype"], "f32", "{row}");
        assert_eq!(row["status"], "ok", "{row}");
        assert!(row["median_ms"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["min_ms"].as_f64() <= row["median_ms"].as_f64(), "{row}");
        assert!(row["median_ms"].as_f64() <= row["max_ms"].as_f64(), "{row}");
        assert!(row["gflops"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["gbps"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["first_call_ms"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["runs"].as_u64().unwrap() >= 1, "{row}");
        assert_eq!(row["min_runs"], 1, "{row}");
        assert_eq!(row["min_time_s"].as_f64(), Some(0.0), "{row}");
        assert_eq!(row["crate_version"], env!("CARGO_PKG_VERSION"), "{row}");
    }
    for row in &rows[..2] {
        let timing = row["timing"].as_str().unwrap();
        assert!(
            timing == "gpu-timestamps" || timing == "wall-clock",
            "{row}"
        );
    }
    assert_eq!(rows[2]["timing"], "wall-clock");
    // The reference runs on the host, the kernels on the adapter.
    assert_eq!(rows[0]["runs_on"], "adapter");
    assert_eq!(rows[1]["runs_on"], "adapter");
    assert_eq!(rows[2]["runs_on"], "host");
}

#[test]
fn bench_f16_counts_two_bytes_per_element() {
    // A decoding step: Q, K, V and the output are 2 · 2 · 2,048 · 64 + 2 · 2 · 64 values, so
    // one call moves 1,048,576 + 512 bytes in f16 and twice that in f32.
    let shape = ["--shape", "1,2,2,1,2048,64", "--kernel", "flash", "--json"];
    let mut rows = Vec::new();
    for dtype in ["f16", "f32"] {
        let output = bench(&[&shape[..], &["--dtype", dtype]].concat());
        assert!(output.status.success(), "{}", stderr(&output));
        rows.extend(json_lines(&output));
    }
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["case"], "b1_h2_hkv2_q1_kv2048_d64_f16");
    assert_eq!(rows[1]["case"], "b1_h2_hkv2_q1_kv2048_d64");
    for (row, (dtype, bytes)) in rows
        .iter()
        .zip([("f16", 1_049_088.0), ("f32", 2_098_176.0)])
    {
        assert_eq!(row["dtype"], dtype, "{row}");
        assert_eq!(row["status"], "ok", "{row}");
        let seconds = row["median_ms"].as_f64().unwrap() / 1e3;
        let gbps = row["gbps"].as_f64().unwrap();
        let measured = gbps * 1e9 * seconds;
        assert!(
            (measured - bytes).abs() < 1e-6 * bytes,
            "{row}: {measured} bytes"
        );
    }
}

/// Runs `bench` with `args`, which it must reject, and checks that its message contains each
/// of `parts`.
fn assert_rejected(args: &[&str], parts: &[&str]) {
    let output = bench(args);
    assert!(!output.status.success(), "bench {args:?} succeeded");
    let message = stderr(&output);
    for part in parts {
        assert!(message.contains(part), "{message}");
    }
}

#[test]
fn bench_rejects_unknown_dtype() {
    assert_rejected(
        &["--shape", "1,1,1,8,8,8", "--dtype", "bf16"],
        &["unknown dtype `bf16`", "f32 or f16"],
    );
}

#[test]
fn bench_rejects_short_shape() {
    assert_rejected(
        &["--shape", "1,2,3"],
        &["`1,2,3` has 3 comma-separated values", "B,H,HKV,SQ,SKV,D"],
    );
}

#[test]
fn bench_rejects_unknown_kernel() {
    assert_rejected(
        &["--shape", "1,1,1,8,8,8", "--kernel", "flash,fast"],
        &["unknown kernel `fast`"],
    );
}

#[test]
fn bench_filter_selects_cases() {
    let output = bench(&["--filter", "q128", "--kernel", "flash", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let rows = json_lines(&output);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["case"], "b4_h12_hkv12_q128_kv128_d32");
    assert_eq!(rows[0]["status"], "ok");
}

#[test]
fn bench_filter_without_match_fails() {
    assert_rejected(
        &["--filter", "no-such-case"],
        &[
            "no case label contains `no-such-case`",
            "b1_h8_hkv8_q512_kv512_d64",
        ],
    );
}

#[test]
fn bench_reports_unsupported_case() {
    // One head's score matrix is 8192 × 8192 f32 values, 256 MiB: over llvmpipe's storage
    // binding limit of 128 MiB, so the three-stage kernel rejects it there. Adapters with a
    // larger limit run it.
    let output = bench(&[
        "--shape",
        "1,1,1,8192,8192,8",
        "--kernel",
        "three-stage",
        "--json",
    ]);
    let rows = json_lines(&output);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    if row["adapter"].as_str().unwrap().contains("llvmpipe") {
        assert_eq!(row["status"], "unsupported", "{row}");
    }
    if row["status"] == "unsupported" {
        let message = row["message"].as_str().unwrap();
        assert!(message.contains("max_storage_buffer_binding_size"), "{row}");
        assert!(row["median_ms"].is_null(), "{row}");
        assert_eq!(row["runs"], 0, "{row}");
        // With nothing timed, the run fails and prints the reason.
        assert!(!output.status.success());
        assert!(
            stderr(&output).contains("no kernel ran"),
            "{}",
            stderr(&output)
        );
    } else {
        assert_eq!(row["status"], "ok", "{row}");
        assert!(output.status.success(), "{}", stderr(&output));
    }
}

#[test]
fn bench_fails_when_only_reference_ran() {
    // The decoding program takes head dims up to 128 on every adapter, so only the reference
    // runs, and a script comparing adapters must see the failure.
    let output = bench(&[
        "--shape",
        "1,1,1,4,4,256",
        "--kernel",
        "flash-decode,reference",
        "--json",
    ]);
    let rows = json_lines(&output);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["status"], "unsupported", "{}", rows[0]);
    assert_eq!(rows[1]["status"], "ok", "{}", rows[1]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("no GPU kernel ran"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bench_rejects_huge_shape_before_drawing_inputs() {
    // 13 TB per tensor, over any device's largest buffer: drawing the inputs first would abort
    // the process on allocation.
    let output = bench(&[
        "--shape",
        "100000,64,64,4096,4096,128",
        "--kernel",
        "flash,reference",
        "--json",
    ]);
    // Neither kernel runs, so the run fails after reporting both.
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("no kernel ran"),
        "{}",
        stderr(&output)
    );
    let rows = json_lines(&output);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["status"], "unsupported", "{}", rows[0]);
    let message = rows[0]["message"].as_str().unwrap();
    assert!(message.contains("max_buffer_size"), "{message}");
    assert_eq!(rows[1]["status"], "skipped", "{}", rows[1]);
}

#[test]
fn bench_footer_names_the_clocks_of_what_ran() {
    let footer = |kernels: &str| {
        let output = bench(&["--shape", "1,1,1,4,4,8", "--kernel", kernels]);
        assert!(output.status.success(), "{}", stderr(&output));
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let line = text.lines().find(|line| line.contains(" times: "));
        line.unwrap_or_else(|| panic!("no timing line in\n{text}"))
            .to_string()
    };
    // With the reference alone, no GPU kernel ran, so no GPU clock is named.
    assert_eq!(footer("reference"), "reference times: host clock");
    let both = footer("flash,reference");
    assert!(both.starts_with("GPU kernel times: "), "{both}");
    assert!(both.ends_with("; reference times: host clock"), "{both}");
    let gpu = footer("flash");
    assert!(gpu.starts_with("GPU kernel times: "), "{gpu}");
    assert!(!gpu.contains("reference"), "{gpu}");
}
