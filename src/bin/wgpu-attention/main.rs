//! `wgpu-attention`: lists adapters and checks the attention kernels on fixture files.

mod bench;
mod check;
mod comparison;
mod info;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wgpu_attention::Context;

#[derive(Parser)]
#[command(
    version,
    about = "Multi-head attention on wgpu, checked against an f64 CPU reference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every adapter wgpu finds, with the features and limits the kernels depend on.
    Info(info::InfoArgs),
    /// Run the GPU kernels and the CPU reference on safetensors fixture files and compare them
    /// with each file's expected output.
    Check(check::CheckArgs),
    /// Time the GPU kernels and the f64 CPU reference on a grid of shapes, or on one --shape,
    /// and report the median time, GFLOP/s and GB/s of each.
    Bench(bench::BenchArgs),
    /// Run the GPU kernels on a grid of generated problems (odd lengths, decoding, grouped-query
    /// heads, masks, soft-capping, sliding windows, f32 and f16) and compare each output with the
    /// f64 CPU reference.
    Validate(validate::ValidateArgs),
}

fn main() -> ExitCode {
    restore_broken_pipe_exit();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(args) => info::run(&args),
        Command::Check(args) => check::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Validate(args) => validate::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Lets a closed output pipe end the process quietly, as it does other command-line tools, so
/// that `wgpu-attention validate --list | head` stops without a panic. Rust's runtime ignores
/// SIGPIPE, which turns the closed pipe into an error that `println!` panics on.
fn restore_broken_pipe_exit() {
    #[cfg(unix)]
    // SAFETY: called first in main, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Opens the adapter named by `--adapter`, or by `WGPU_ATTENTION_ADAPTER` when it is absent.
/// When no adapter matches, it prints a note on stderr that names which of the two made the
/// request.
pub(crate) fn open_context(adapter: Option<&str>) -> wgpu_attention::Result<Context> {
    let result = match adapter {
        Some(name) => Context::with_adapter(Some(name)),
        None => Context::new(),
    };
    if let Err(wgpu_attention::Error::AdapterNotFound { request, .. }) = &result {
        let source = match adapter {
            Some(_) => "--adapter".to_string(),
            None => format!(
                "the environment variable {}; unset it or pass --adapter",
                wgpu_attention::ADAPTER_ENV
            ),
        };
        eprintln!("note: the adapter `{request}` was requested by {source}");
    }
    result
}

/// The driver's name for JSON reports; where the backend gives none (OpenGL), its version
/// string, which names the driver (such as `4.5 (Core Profile) Mesa 22.3.6`).
pub(crate) fn driver_name(info: &wgpu::AdapterInfo) -> &str {
    if info.driver.is_empty() {
        &info.driver_info
    } else {
        &info.driver
    }
}

/// Returns the driver's name and version for reports, or only the version where the backend
/// gives no name (as OpenGL does).
pub(crate) fn driver_label(info: &wgpu::AdapterInfo) -> String {
    if info.driver.is_empty() {
        info.driver_info.clone()
    } else {
        format!("{} ({})", info.driver, info.driver_info)
    }
}

/// The adapter's name and backend for reports.
pub(crate) fn adapter_label(context: &Context) -> String {
    let info = context.adapter_info();
    format!(
        "{} ({})",
        info.name,
        wgpu_attention::backend_name(info.backend)
    )
}
