//! `wgpu-attention validate`, run as a user would: listing the grid, and running a few small
//! cases so that the tests take seconds.

#![cfg(feature = "cli")]

use std::collections::HashSet;
use std::process::{Command, Output};

/// Every field that `validate --json` writes on each line.
const JSON_FIELDS: [&str; 14] = [
    "name",
    "kernel",
    "program",
    "f16_on_host",
    "dtype",
    "status",
    "max_abs",
    "nmse",
    "max_abs_excess",
    "nmse_excess",
    "tolerance",
    "seed",
    "message",
    "adapter",
];

fn validate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgpu-attention"))
        .arg("validate")
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `validate --list` with `args` and returns the case names and the count it prints last.
fn list(args: &[&str]) -> (Vec<String>, usize) {
    let output = validate(&[&["--list"], args].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let count_line = lines.pop().expect("--list printed nothing");
    let count = count_line
        .strip_suffix(" cases")
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("last line is not `N cases`: {count_line}"));
    (lines, count)
}

/// Returns `batch · heads · seq_q · seq_kv · head_dim` read from a name such as
/// `b2_h8_hkv2_q17_kv113_d59_causal-br`.
fn work_of(name: &str) -> usize {
    let value = |prefix: &str| -> usize {
        name.split('_')
            .find_map(|part| part.strip_prefix(prefix)?.parse().ok())
            .unwrap_or_else(|| panic!("no `{prefix}N` in {name}"))
    };
    value("b") * value("h") * value("q") * value("kv") * value("d")
}

/// Returns the problem name (without the kernel) of the cheapest f32 case of the quick subset.
fn smallest_quick_problem() -> String {
    let (names, _) = list(&["--quick"]);
    names
        .iter()
        .map(|name| name.split(' ').next().unwrap().to_string())
        .filter(|problem| !problem.ends_with("_f16"))
        .min_by_key(|problem| work_of(problem))
        .unwrap()
}

#[test]
fn validate_full_grid_has_2000_cases() {
    let (names, count) = list(&[]);
    assert_eq!(names.len(), count);
    assert!(count >= 2000, "the full grid has only {count} cases");
    let distinct: HashSet<&String> = names.iter().collect();
    assert_eq!(distinct.len(), names.len(), "case names repeat");
}

#[test]
fn validate_quick_is_strict_subset() {
    let (full, _) = list(&[]);
    let (quick, quick_count) = list(&["--quick"]);
    assert_eq!(quick.len(), quick_count);
    assert!(!quick.is_empty());
    assert!(quick.len() < full.len());
    let full: HashSet<&String> = full.iter().collect();
    for name in &quick {
        assert!(
            full.contains(name),
            "quick case `{name}` is not in the full grid"
        );
    }
}

#[test]
fn validate_quick_covers_every_kernel_and_dtype() {
    let (quick, _) = list(&["--quick"]);
    for kernel in [
        "flash-tiled",
        "flash-rows",
        "flash-decode",
        "flash-subgroup",
        "three-stage",
    ] {
        let suffix = format!(" {kernel}");
        assert!(
            quick.iter().any(|name| name.ends_with(&suffix)),
            "no quick case runs {kernel}"
        );
    }
    assert!(quick.iter().any(|name| name.contains("_f16 ")));
    assert!(quick.iter().any(|name| !name.contains("_f16 ")));
    for option in [
        "causal-tl",
        "causal-br",
        "_mask1x1",
        "_cap30",
        "_win16-0",
        "_win8-8",
    ] {
        assert!(
            quick.iter().any(|name| name.contains(option)),
            "no quick case has {option}"
        );
    }
}

#[test]
fn validate_kernel_option_selects_cases() {
    let (names, count) = list(&["--kernel", "three-stage"]);
    assert!(count > 0);
    for name in &names {
        assert!(name.ends_with(" three-stage"), "{name}");
    }
}

#[test]
fn validate_quick_filter_passes() {
    let problem = smallest_quick_problem();
    // The trailing space keeps the problem's f16 cases (`<problem>_f16 <kernel>`) out.
    let output = validate(&["--quick", "--filter", &format!("{problem} ")]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}\n{}", stderr(&output));
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].ends_with(", 5 cases"), "{text}");
    let cases = &lines[1..lines.len() - 1];
    assert_eq!(cases.len(), 5, "{text}");
    for line in cases {
        assert!(
            line.starts_with("PASS ") || line.starts_with("SKIP "),
            "{line}"
        );
        assert!(line.contains(&format!(" {problem} ")), "{line}");
        assert!(line.contains("  seed 0x"), "{line}");
    }
    // The summary reads `N passed, 0 failed, K skipped`, alone on the last line.
    let words: Vec<&str> = lines.last().unwrap().split(' ').collect();
    assert_eq!(words.len(), 6, "{text}");
    assert_eq!(
        [words[1], words[2], words[3], words[5]],
        ["passed,", "0", "failed,", "skipped"],
        "{text}"
    );
    assert!(words[0].parse::<usize>().is_ok(), "{text}");
    assert!(words[4].parse::<usize>().is_ok(), "{text}");
}

#[test]
fn validate_json_lines_parse() {
    let problem = smallest_quick_problem();
    let output = validate(&["--quick", "--filter", &format!("{problem} "), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let rows: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}")))
        .collect();
    assert_eq!(rows.len(), 5, "{rows:?}");
    for row in &rows {
        for field in JSON_FIELDS {
            assert!(row.get(field).is_some(), "missing `{field}` in {row}");
        }
        assert_eq!(row["name"], problem.as_str(), "{row}");
        assert_eq!(row["dtype"], "f32", "{row}");
        assert_eq!(row["status"], "pass", "{row}");
        assert!(row["max_abs"].as_f64().unwrap() <= 1e-5, "{row}");
        let seed = row["seed"].as_str().unwrap();
        assert!(seed.starts_with("0x"), "{row}");
        assert_eq!(seed.len(), 18, "{row}");
        assert!(row["tolerance"]["abs"].is_number(), "{row}");
        assert!(row["adapter"].is_string(), "{row}");
        assert!(row["message"].is_null(), "{row}");
        // The grid's kernels are programs of their own, and f32 cases never convert.
        assert_eq!(row["program"], row["kernel"], "{row}");
        assert_eq!(row["f16_on_host"], false, "{row}");
    }
    let summary = stderr(&output);
    assert!(
        summary.contains("5 passed, 0 failed, 0 skipped"),
        "{summary}"
    );
}

#[test]
fn validate_reports_unsupported_as_skip() {
    // The row program of the fused kernel stops at head dim 128, on every adapter. A run whose
    // every case was skipped checked nothing, and fails.
    let (names, _) = list(&["--kernel", "flash-rows", "--filter", "_d256"]);
    let case = names
        .iter()
        .map(|name| name.split(' ').next().unwrap())
        .min_by_key(|problem| work_of(problem))
        .expect("the grid has head dim 256");
    let output = validate(&["--kernel", "flash-rows", "--filter", &format!("{case} ")]);
    let text = stdout(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains(&format!("SKIP {case} flash-rows")), "{text}");
    assert!(text.contains("(unsupported: "), "{text}");
    assert!(
        text.lines()
            .any(|line| line == "0 passed, 0 failed, 1 skipped"),
        "{text}"
    );
    let message = stderr(&output);
    assert!(message.contains("error: no case ran"), "{message}");
}

#[test]
fn validate_all_names_default_kernels() {
    let all = validate(&["--list", "--quick", "--kernel", "all"]);
    let default = validate(&["--list", "--quick"]);
    assert!(all.status.success(), "{}", stderr(&all));
    assert_eq!(stdout(&all), stdout(&default));
}

#[test]
fn validate_rejects_unknown_kernel() {
    let output = validate(&["--list", "--kernel", "flash-tiled,fast"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("unknown kernel `fast`"), "{message}");
    assert!(
        message.contains("flash-tiled, flash-rows, flash-decode, flash-subgroup, three-stage"),
        "{message}"
    );
}

#[test]
fn validate_filter_without_match_fails() {
    let output = validate(&["--filter", "no-such-case"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("no case name contains `no-such-case`"),
        "{message}"
    );
}

#[test]
fn validate_names_the_program_flash_ran() {
    let problem = smallest_quick_problem();
    let output = validate(&[
        "--quick",
        "--kernel",
        "flash",
        "--filter",
        &format!("{problem} "),
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let row: serde_json::Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(row["kernel"], "flash", "{row}");
    let program = row["program"].as_str().unwrap();
    assert!(
        program.starts_with("flash-"),
        "flash ran as `{program}`: {row}"
    );
}

#[test]
fn validate_rejects_reference_as_kernel() {
    let output = validate(&["--list", "--kernel", "reference"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("`check --kernel reference` compares it"),
        "{message}"
    );
}
