//! `check`: runs the kernels and the reference on fixture files and compares them with the
//! files' expected outputs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::json;
use wgpu_attention::fixture::{self, Fixture};
use wgpu_attention::validate::{ErrorStats, Tolerance};
use wgpu_attention::{AttentionOutput, Context, Kernel, f16, reference};

#[derive(clap::Args)]
pub(crate) struct CheckArgs {
    /// Safetensors fixture files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print one JSON object per file instead of text.
    #[arg(long)]
    json: bool,
    /// Adapter: a part of its name or a backend (vulkan, metal, dx12, gl). Defaults to
    /// WGPU_ATTENTION_ADAPTER, then to the best adapter found.
    #[arg(long)]
    adapter: Option<String>,
    /// Kernel to check: auto, flash, flash-tiled, flash-rows, flash-decode, flash-subgroup or
    /// three-stage.
    #[arg(long, default_value = "auto", value_parser = crate::parse_kernel)]
    kernel: Kernel,
    /// Write each file's GPU output to DIR/<file stem>.safetensors (tensors `out` and `lse`),
    /// also for files that fail.
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
}

/// The comparisons made for one file.
struct Report {
    gpu_vs_expected: ErrorStats,
    gpu_vs_reference: ErrorStats,
    reference_vs_expected: ErrorStats,
    lse_vs_expected: Option<ErrorStats>,
    /// The limits the file was judged by: f16 for files with f16 inputs, else f32.
    tolerance: Tolerance,
    passed: bool,
}

pub(crate) fn run(args: &CheckArgs) -> Result<ExitCode, wgpu_attention::Error> {
    let context = crate::open_context(args.adapter.as_deref())?;
    let adapter = crate::adapter_label(&context);
    if let Some(dir) = &args.save {
        std::fs::create_dir_all(dir).map_err(|source| wgpu_attention::Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
    }
    if !args.json {
        println!("adapter: {adapter}, kernel: {}", args.kernel.name());
    }
    let (mut passed, mut failed) = (0, 0);
    for path in &args.files {
        match check_file(&context, args, path) {
            Ok((fixture, report)) => {
                if report.passed {
                    passed += 1;
                } else {
                    failed += 1;
                }
                let kernel = args.kernel.resolve(&fixture.problem, &context);
                if args.json {
                    println!("{}", report_json(path, &adapter, kernel, &fixture, &report));
                } else {
                    print_report(path, kernel, &fixture, &report);
                }
            }
            Err(error) => {
                failed += 1;
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
                }
            }
        }
    }
    if !args.json {
        println!("{passed} passed, {failed} failed");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn check_file(
    context: &Context,
    args: &CheckArgs,
    path: &Path,
) -> wgpu_attention::Result<(Fixture, Report)> {
    let fixture = Fixture::load(path)?;
    let inputs = fixture.inputs();
    // Files with f16 inputs run with f16 storage and are judged by the f16 tolerance.
    let (gpu, tolerance) = if fixture.f16_inputs {
        let half = |x: &[f32]| x.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
        let (q, k, v) = (
            half(&fixture.tensors.q),
            half(&fixture.tensors.k),
            half(&fixture.tensors.v),
        );
        let half_inputs = inputs.with_tensors(&q, &k, &v);
        let output = context.attention_f16(args.kernel, &fixture.problem, &half_inputs)?;
        let out = output.out.iter().map(|x| x.to_f32()).collect();
        (
            AttentionOutput {
                out,
                lse: output.lse,
            },
            Tolerance::F16,
        )
    } else {
        (
            context.attention_with(args.kernel, &fixture.problem, &inputs)?,
            Tolerance::F32,
        )
    };
    let tolerance = &tolerance;
    if let Some(dir) = &args.save {
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        let metadata = HashMap::from([
            (
                "source".to_string(),
                format!("wgpu-attention {}", env!("CARGO_PKG_VERSION")),
            ),
            (
                "kernel".to_string(),
                args.kernel
                    .resolve(&fixture.problem, context)
                    .name()
                    .to_string(),
            ),
            ("adapter".to_string(), crate::adapter_label(context)),
            ("input".to_string(), path.display().to_string()),
        ]);
        fixture::save_output(
            dir.join(format!("{stem}.safetensors")),
            &fixture.problem,
            &gpu.out,
            Some(&gpu.lse),
            metadata,
        )?;
    }
    let reference = reference::attention(&fixture.problem, &inputs)?;
    let gpu_vs_expected = ErrorStats::compare(&gpu.out, &fixture.out);
    let gpu_vs_reference = ErrorStats::compare(&gpu.out, &reference.out);
    let reference_vs_expected = ErrorStats::compare(&reference.out, &fixture.out);
    let lse_vs_expected = fixture
        .lse
        .as_ref()
        .map(|lse| ErrorStats::compare(&gpu.lse, lse));
    let passed = gpu_vs_expected.passes(tolerance)
        && gpu_vs_reference.passes(tolerance)
        && lse_vs_expected
            .as_ref()
            .is_none_or(|stats| stats.passes(tolerance));
    let report = Report {
        gpu_vs_expected,
        gpu_vs_reference,
        reference_vs_expected,
        lse_vs_expected,
        tolerance: *tolerance,
        passed,
    };
    Ok((fixture, report))
}

fn print_report(path: &Path, kernel: Kernel, fixture: &Fixture, report: &Report) {
    let status = if report.passed { "PASS" } else { "FAIL" };
    println!(
        "{status} {} ({}, {})",
        path.display(),
        fixture.problem.label(),
        kernel.name()
    );
    println!("    gpu vs expected        {}", report.gpu_vs_expected);
    println!("    gpu vs reference       {}", report.gpu_vs_reference);
    println!(
        "    reference vs expected  {}",
        report.reference_vs_expected
    );
    if let Some(stats) = &report.lse_vs_expected {
        println!("    gpu lse vs expected    {stats}");
    }
}

fn stats_json(stats: &ErrorStats) -> serde_json::Value {
    json!({
        "max_abs": stats.max_abs,
        "max_rel": stats.max_rel,
        "nmse": stats.nmse,
        "worst_index": stats.worst_index,
        "nonfinite_mismatches": stats.nonfinite_mismatches,
    })
}

fn report_json(
    path: &Path,
    adapter: &str,
    kernel: Kernel,
    fixture: &Fixture,
    report: &Report,
) -> serde_json::Value {
    let tolerance = &report.tolerance;
    json!({
        "file": path.display().to_string(),
        "adapter": adapter,
        "kernel": kernel.name(),
        "problem": fixture.problem.label(),
        "status": if report.passed { "pass" } else { "fail" },
        "gpu_vs_expected": stats_json(&report.gpu_vs_expected),
        "gpu_vs_reference": stats_json(&report.gpu_vs_reference),
        "reference_vs_expected": stats_json(&report.reference_vs_expected),
        "lse_vs_expected": report.lse_vs_expected.as_ref().map(stats_json),
        "tolerance": { "abs": tolerance.abs, "nmse": tolerance.nmse },
    })
}
