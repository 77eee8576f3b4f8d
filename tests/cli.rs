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

fn scratch_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("wgpu-attention-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
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
        .arg(&dir)
        .args(files)
        .output()
        .unwrap();
    assert!(output.status.success());
    for layer in 0..2 {
        let bytes = std::fs::read(dir.join(format!("minilm_layer{layer}.safetensors"))).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(tensors.tensor("out").unwrap().shape(), &[2, 12, 9, 32]);
        assert_eq!(tensors.tensor("lse").unwrap().shape(), &[2, 12, 9]);
    }
}

#[test]
fn check_reports_malformed_file_and_fails() {
    let dir = scratch_dir("malformed");
    let bad = dir.join("broken.safetensors");
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
    assert!(stdout.contains("1 passed, 1 failed"), "{stdout}");
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
}

#[test]
fn info_lists_an_adapter() {
    let output = binary().args(["info", "--json"]).output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
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
