//! `check`: runs a kernel and the reference on fixture files and compares them with the files'
//! expected outputs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::json;
use wgpu_attention::fixture::{self, Fixture};
use wgpu_attention::validate::Tolerance;
use wgpu_attention::{AttentionOutput, Context, Kernel, f16, reference};

use crate::comparison::{Comparison, Sides};

#[derive(clap::Args)]
pub(crate) struct CheckArgs {
    /// Safetensors fixture files: BHSD tensors q, k and v, the expected out, and optionally
    /// mask, probs, lse, sinks, alibi_slopes and kv_seq_lens, with string metadata scale and
    /// causal. The README's `check` paragraph and the `fixture` module's documentation give
    /// the whole format.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print one JSON object per file instead of text. Its fields are file, adapter, kernel,
    /// problem, status (pass, fail or error), failed (the failing comparisons), warnings and
    /// tolerance. Each comparison (gpu_vs_expected, gpu_vs_reference, reference_vs_expected,
    /// lse_vs_expected and probs_vs_expected, null where absent) is an object with the error
    /// statistics, the limits, the largest error's index and values, and the count of elements
    /// over the limit per head.
    #[arg(long)]
    json: bool,
    /// Adapter: a part of its name or a backend (vulkan, metal, dx12, gl). Defaults to
    /// WGPU_ATTENTION_ADAPTER, then to the best adapter found.
    #[arg(long)]
    adapter: Option<String>,
    /// The kernel to check: a GPU kernel (auto, flash, flash-tiled, flash-rows, flash-decode,
    /// flash-subgroup or three-stage), or reference, the f64 CPU reference alone, which needs
    /// no adapter.
    #[arg(long, default_value = "auto", value_parser = parse_checked)]
    kernel: Checked,
    /// Write each file's output to DIR/<file stem>.safetensors (tensors `out` and `lse`), also
    /// for files that fail; with `--kernel reference`, the reference's output rounded to f32.
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
}

/// The GPU kernel or the reference that `check` runs on each file.
#[derive(Clone, Copy, Debug)]
enum Checked {
    Gpu(Kernel),
    Reference,
}

fn parse_checked(name: &str) -> Result<Checked, String> {
    if name == "reference" {
        return Ok(Checked::Reference);
    }
    if name.contains(',') {
        return Err(format!(
            "check runs one kernel per call, but `{name}` names several; run check once per \
             kernel"
        ));
    }
    Kernel::from_name(name).map(Checked::Gpu).ok_or_else(|| {
        format!(
            "unknown kernel `{name}`; expected auto, flash, flash-tiled, flash-rows, flash-decode, \
             flash-subgroup, three-stage or reference"
        )
    })
}

/// The comparisons of a GPU kernel's output.
struct GpuComparisons {
    /// Against the file's output, where the file has one.
    vs_expected: Option<Comparison>,
    vs_reference: Comparison,
}

/// The comparisons made for one file.
struct Report {
    /// The kernel that ran, or `reference`.
    checked: &'static str,
    /// Absent with `--kernel reference`.
    gpu: Option<GpuComparisons>,
    /// The reference's output against the file's, where the file has one.
    reference_vs_expected: Option<Comparison>,
    /// The checked output's log-sum-exp against the file's, where the file has one.
    lse_vs_expected: Option<Comparison>,
    /// The reference's attention probabilities against the file's, where the file has them.
    probs_vs_expected: Option<Comparison>,
    /// The limits of the file's dtype: f16 for files with f16 inputs, else f32.
    tolerance: Tolerance,
}

impl Report {
    /// Returns the comparisons that decide whether the file passes, by their JSON keys. They are
    /// the GPU output against the file's and the reference's (or, with the reference alone, the
    /// reference's against the file's), and the checked log-sum-exp and the reference's
    /// probabilities where the file has them.
    fn judged(&self) -> Vec<(&'static str, &Comparison)> {
        let mut judged = Vec::new();
        match &self.gpu {
            Some(gpu) => {
                if let Some(comparison) = &gpu.vs_expected {
                    judged.push(("gpu_vs_expected", comparison));
                }
                judged.push(("gpu_vs_reference", &gpu.vs_reference));
            }
            None => {
                if let Some(comparison) = &self.reference_vs_expected {
                    judged.push(("reference_vs_expected", comparison));
                }
            }
        }
        if let Some(comparison) = &self.lse_vs_expected {
            judged.push(("lse_vs_expected", comparison));
        }
        if let Some(comparison) = &self.probs_vs_expected {
            judged.push(("probs_vs_expected", comparison));
        }
        judged
    }

    /// Returns the JSON keys of the judged comparisons that are over their tolerance.
    fn failed(&self) -> Vec<&'static str> {
        self.judged()
            .into_iter()
            .filter(|(_, comparison)| !comparison.passes())
            .map(|(key, _)| key)
            .collect()
    }

    fn passed(&self) -> bool {
        self.failed().is_empty()
    }
}

pub(crate) fn run(args: &CheckArgs) -> Result<ExitCode, wgpu_attention::Error> {
    if let Some(dir) = &args.save
        && let Err(message) = check_save_paths(dir, &args.files)
    {
        eprintln!("error: {message}");
        return Ok(ExitCode::FAILURE);
    }
    // The adapter and kernel for a GPU check; none for the reference alone.
    let gpu = match args.kernel {
        Checked::Gpu(kernel) => Some((crate::open_context(args.adapter.as_deref())?, kernel)),
        Checked::Reference => None,
    };
    // The adapter's name and backend; none (null in JSON) for the reference alone.
    let adapter = gpu
        .as_ref()
        .map(|(context, _)| crate::adapter_label(context));
    if let Some(dir) = &args.save
        && let Err(error) = std::fs::create_dir_all(dir)
    {
        eprintln!(
            "error: --save {}: creating the directory failed: {error}; pass a directory that can \
             be created or written",
            dir.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    if !args.json {
        let kernel = match args.kernel {
            Checked::Gpu(kernel) => kernel.name(),
            Checked::Reference => "reference (f64, CPU)",
        };
        let adapter = adapter.as_deref().unwrap_or("none");
        println!("adapter: {adapter}, kernel: {kernel}");
    }
    let (mut passed, mut failed, mut errors) = (0, 0, 0);
    for path in &args.files {
        let gpu = gpu.as_ref().map(|(context, kernel)| (context, *kernel));
        match check_file(gpu, args, path) {
            Ok((fixture, report)) => {
                if report.passed() {
                    passed += 1;
                } else {
                    failed += 1;
                }
                if args.json {
                    println!(
                        "{}",
                        report_json(path, adapter.as_deref(), &fixture, &report)
                    );
                } else {
                    print_report(path, &fixture, &report);
                }
            }
            Err(error) => {
                errors += 1;
                if args.json {
                    let object = json!({
                        "file": path.display().to_string(),
                        "adapter": adapter,
                        "status": "error",
                        "error": error.to_string(),
                    });
                    println!("{object}");
                } else {
                    // File errors already start with the path.
                    match error {
                        wgpu_attention::Error::Io { .. }
                        | wgpu_attention::Error::Fixture { .. } => {
                            println!("ERROR {error}")
                        }
                        _ => println!("ERROR {}: {error}", path.display()),
                    }
                    // The library's fix is written for callers that create their own device. auto
                    // and flash already pick a program the adapter runs, so they get no hint.
                    let named_program = matches!(
                        args.kernel,
                        Checked::Gpu(kernel) if !matches!(kernel, Kernel::Auto | Kernel::Flash)
                    );
                    if named_program
                        && matches!(
                            error,
                            wgpu_attention::Error::Unsupported { .. }
                                | wgpu_attention::Error::MissingFeature { .. }
                        )
                    {
                        println!(
                            "    --kernel auto (the default) or flash picks a program this \
                             adapter runs; --adapter picks another adapter"
                        );
                    }
                }
            }
        }
    }
    if !args.json {
        let noun = if errors == 1 { "error" } else { "errors" };
        println!("{passed} passed, {failed} failed, {errors} {noun}");
    }
    Ok(if failed == 0 && errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Returns the file that `--save DIR` writes for the fixture at `path`.
fn save_path(dir: &Path, path: &Path) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    dir.join(format!("{stem}.safetensors"))
}

/// Checks, before anything runs, that `--save DIR` is a directory or can become one, that no
/// output would overwrite an input file, and that no two inputs share an output file.
fn check_save_paths(dir: &Path, files: &[PathBuf]) -> Result<(), String> {
    if dir.exists() && !dir.is_dir() {
        return Err(format!(
            "--save {}: not a directory; pass a directory for the output files",
            dir.display()
        ));
    }
    // Paths are compared after resolving links and `..` where the file exists.
    let resolve = |path: &Path| path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let inputs: Vec<PathBuf> = files.iter().map(|file| resolve(file)).collect();
    let mut outputs: HashMap<PathBuf, &Path> = HashMap::new();
    for file in files {
        let output = resolve(&save_path(dir, file));
        if inputs.contains(&output) {
            return Err(format!(
                "--save {} would overwrite the input file {}; save to another directory",
                dir.display(),
                output.display()
            ));
        }
        if let Some(other) = outputs.insert(output.clone(), file) {
            return Err(format!(
                "{} and {} would both be saved as {}; save them in separate runs",
                other.display(),
                file.display(),
                output.display()
            ));
        }
    }
    Ok(())
}

/// Runs `kernel` on the fixture's inputs, in f16 storage for files with f16 inputs.
fn run_gpu(
    context: &Context,
    kernel: Kernel,
    fixture: &Fixture,
) -> wgpu_attention::Result<AttentionOutput> {
    let inputs = fixture.inputs();
    if !fixture.f16_inputs {
        return context.attention_with(kernel, &fixture.problem, &inputs);
    }
    let half = |x: &[f32]| x.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
    let (q, k, v) = (
        half(&fixture.tensors.q),
        half(&fixture.tensors.k),
        half(&fixture.tensors.v),
    );
    let output =
        context.attention_f16(kernel, &fixture.problem, &inputs.with_tensors(&q, &k, &v))?;
    Ok(AttentionOutput {
        out: output.out.iter().map(|x| x.to_f32()).collect(),
        lse: output.lse,
    })
}

/// Checks one file with the GPU kernel on its context, or with the reference alone when `gpu`
/// is `None`.
fn check_file(
    gpu: Option<(&Context, Kernel)>,
    args: &CheckArgs,
    path: &Path,
) -> wgpu_attention::Result<(Fixture, Report)> {
    let fixture = Fixture::load(path)?;
    // Files with f16 inputs are judged by the f16 tolerance.
    let tolerance = if fixture.f16_inputs {
        Tolerance::F16
    } else {
        Tolerance::F32
    };
    // The reference computes probabilities only for files that store `probs`.
    let (reference, reference_probs) = if fixture.probs.is_some() {
        let (output, probs) = reference::attention_with_probs(&fixture.problem, &fixture.inputs())?;
        (output, Some(probs))
    } else {
        (
            reference::attention(&fixture.problem, &fixture.inputs())?,
            None,
        )
    };
    // Every output is judged beyond the reference's allowance for f32 score rounding. A GPU
    // result against the file's output compares two approximations, which may each be off by
    // the tolerance, so that comparison gets twice the limits.
    let s = &fixture.problem.shape;
    let out_dims = [s.batch, s.heads, s.seq_q, s.head_dim_v];
    let sensitivity = Some(reference.out_score_sensitivity.as_slice());
    let reference_vs_expected = fixture.out.as_ref().map(|expected| {
        Comparison::new(
            &reference.out,
            expected,
            sensitivity,
            &out_dims,
            tolerance,
            Sides::OneApproximate,
        )
    });
    let (checked, output, comparisons) = match gpu {
        Some((context, kernel)) => {
            let output = run_gpu(context, kernel, &fixture)?;
            let comparisons = GpuComparisons {
                vs_expected: fixture.out.as_ref().map(|expected| {
                    Comparison::new(
                        &output.out,
                        expected,
                        sensitivity,
                        &out_dims,
                        tolerance,
                        Sides::BothApproximate,
                    )
                }),
                vs_reference: Comparison::new(
                    &output.out,
                    &reference.out,
                    sensitivity,
                    &out_dims,
                    tolerance,
                    Sides::OneApproximate,
                ),
            };
            let name = kernel.resolve(&fixture.problem, context).name();
            (name, output, Some(comparisons))
        }
        None => {
            let output = AttentionOutput {
                out: reference.out_f32(),
                lse: reference.lse.iter().map(|&x| x as f32).collect(),
            };
            ("reference", output, None)
        }
    };
    if let Some(dir) = &args.save {
        let adapter = gpu.map_or_else(
            || "none".to_string(),
            |(context, _)| crate::adapter_label(context),
        );
        let metadata = HashMap::from([
            (
                "source".to_string(),
                format!("wgpu-attention {}", env!("CARGO_PKG_VERSION")),
            ),
            ("kernel".to_string(), checked.to_string()),
            ("adapter".to_string(), adapter),
            ("input".to_string(), path.display().to_string()),
        ]);
        fixture::save_output(
            save_path(dir, path),
            &fixture.problem,
            &output.out,
            Some(&output.lse),
            metadata,
        )?;
    }
    // The log-sum-exp is f32 in both dtypes. The GPU's and the file's are both approximate, and
    // so is the file's against the reference's.
    let lse_sides = if comparisons.is_some() {
        Sides::BothApproximate
    } else {
        Sides::OneApproximate
    };
    let lse_vs_expected = fixture.lse.as_ref().map(|lse| {
        Comparison::new(
            &output.lse,
            lse,
            Some(&reference.lse_score_sensitivity),
            &[s.batch, s.heads, s.seq_q],
            Tolerance::F32,
            lse_sides,
        )
    });
    let probs_vs_expected = fixture
        .probs
        .as_ref()
        .zip(reference_probs)
        .map(|(expected, probs)| {
            Comparison::new(
                &probs,
                expected,
                None,
                &[s.batch, s.heads, s.seq_q, s.seq_kv],
                tolerance,
                Sides::OneApproximate,
            )
        });
    let report = Report {
        checked,
        gpu: comparisons,
        reference_vs_expected,
        lse_vs_expected,
        probs_vs_expected,
        tolerance,
    };
    Ok((fixture, report))
}

/// Prints the file's verdict and every comparison, marking the judged ones over the tolerance,
/// which a failing file then states.
fn print_report(path: &Path, fixture: &Fixture, report: &Report) {
    let failed = report.failed();
    let status = if failed.is_empty() { "PASS" } else { "FAIL" };
    println!(
        "{status} {} ({}, {})",
        path.display(),
        fixture.problem.label(),
        report.checked
    );
    for warning in &fixture.warnings {
        println!("    warning: {warning}");
    }
    let judged: Vec<&str> = report.judged().into_iter().map(|(key, _)| key).collect();
    let line = |key: &str, label: &str, comparison: &Comparison, index_names: &str| {
        if failed.contains(&key) {
            println!(
                "    {label:<28} {}  <- over the tolerance",
                comparison.stats
            );
            println!("      {}", comparison.failure_details(index_names));
        } else if judged.contains(&key) {
            println!("    {label:<28} {}", comparison.stats);
        } else {
            // Shown for context only. With a GPU output, the file's output is judged against
            // the GPU's.
            println!("    {label:<28} {}  (not judged)", comparison.stats);
        }
    };
    let out_index = "batch, head, row, col";
    if let Some(gpu) = &report.gpu {
        if let Some(comparison) = &gpu.vs_expected {
            line("gpu_vs_expected", "gpu vs expected", comparison, out_index);
        }
        line(
            "gpu_vs_reference",
            "gpu vs reference",
            &gpu.vs_reference,
            out_index,
        );
    }
    if let Some(comparison) = &report.reference_vs_expected {
        line(
            "reference_vs_expected",
            "reference vs expected",
            comparison,
            out_index,
        );
    }
    if let Some(comparison) = &report.lse_vs_expected {
        let source = if report.gpu.is_some() {
            "gpu"
        } else {
            "reference"
        };
        line(
            "lse_vs_expected",
            &format!("{source} lse vs expected"),
            comparison,
            "batch, head, row",
        );
    }
    if let Some(comparison) = &report.probs_vs_expected {
        line(
            "probs_vs_expected",
            "reference probs vs expected",
            comparison,
            "batch, head, row, key",
        );
    }
    if fixture.out.is_none() {
        println!("    the file has no `out`; --save DIR writes the checked output");
    }
    if !failed.is_empty() {
        let tolerance = &report.tolerance;
        let dtype = if *tolerance == Tolerance::F16 {
            "f16"
        } else {
            "f32"
        };
        println!(
            "    {dtype} tolerance: no NaN/inf mismatch, max_abs <= {:e} · max(1, max|expected|) \
             and nmse <= {:e}, beyond an allowance for the f32 rounding of large scores; twice \
             that max_abs and four times that nmse between two approximate results (gpu vs \
             expected, gpu lse vs expected)",
            tolerance.abs, tolerance.nmse
        );
    }
}

fn report_json(
    path: &Path,
    adapter: Option<&str>,
    fixture: &Fixture,
    report: &Report,
) -> serde_json::Value {
    let tolerance = &report.tolerance;
    let gpu = report.gpu.as_ref();
    json!({
        "file": path.display().to_string(),
        "adapter": adapter,
        "kernel": report.checked,
        "problem": fixture.problem.label(),
        "status": if report.passed() { "pass" } else { "fail" },
        "failed": report.failed(),
        "warnings": fixture.warnings,
        "gpu_vs_expected": gpu.and_then(|gpu| gpu.vs_expected.as_ref().map(Comparison::to_json)),
        "gpu_vs_reference": gpu.map(|gpu| gpu.vs_reference.to_json()),
        "reference_vs_expected": report.reference_vs_expected.as_ref().map(Comparison::to_json),
        "lse_vs_expected": report.lse_vs_expected.as_ref().map(Comparison::to_json),
        "probs_vs_expected": report.probs_vs_expected.as_ref().map(Comparison::to_json),
        "tolerance": { "abs": tolerance.abs, "nmse": tolerance.nmse },
    })
}
