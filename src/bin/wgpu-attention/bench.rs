//! `bench`: times the GPU kernels and the f64 CPU reference on a grid of attention shapes.
//!
//! Each (case, kernel) pair gets one warm-up run, reported as the first-call time. Measured runs
//! follow until both `--min-time` and `--min-runs` are reached, and their median is reported.
//! GPU runs work on device buffers uploaded once per case, so uploads and read-backs are never
//! timed.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use wgpu::util::DeviceExt;
use wgpu_attention::{
    AttentionProblem, AttentionShape, Causal, Context, Dtype, Error, GpuTensors, Kernel,
    OwnedInputs, reference,
};

/// Assumed speed of [`reference::attention`], in FLOP/s as [`AttentionProblem::flops`] counts
/// them, for deciding which cases skip it.
// NOTE: an estimate. On a 2-core x86 machine the reference ran the 512 × 512 case (8 heads, head
// dim 64) at 2.3 to 3.6 GFLOP/s, so a slower machine may spend longer than
// `REFERENCE_MAX_SECONDS` on a case that is not skipped.
const REFERENCE_FLOPS_PER_SECOND: f64 = 3e9;

/// Longest estimated time of one reference run for which the reference is still timed.
const REFERENCE_MAX_SECONDS: f64 = 10.0;

/// Kernel names that `--kernel` accepts, for its error message.
const KERNEL_CHOICES: &str = "flash, flash-tiled, flash-rows, flash-decode, flash-subgroup, \
                              three-stage, reference, auto or all";

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// Time one shape instead of the default grid: batch, query heads, key/value heads, query
    /// rows, key/value rows and head dim, comma-separated (e.g. 1,8,8,1024,1024,64).
    #[arg(long, value_name = "B,H,HKV,SQ,SKV,D", value_parser = parse_shape)]
    shape: Option<AttentionShape>,
    /// Causal masking of --shape: none, top_left or bottom_right [default: none].
    #[arg(long, requires = "shape", value_parser = parse_causal)]
    causal: Option<Causal>,
    /// Element type of Q, K, V and the output in GPU memory: f32, or f16 (the adapter needs
    /// SHADER_F16). Arithmetic is f32 either way, and the reference always runs in f64.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: Dtype,
    /// Kernels to time, comma-separated: flash (the fused program chosen for the adapter),
    /// flash-tiled, flash-rows, flash-decode, flash-subgroup, three-stage, reference (the f64
    /// CPU reference, skipped where one run is estimated to take over 10 s), auto, or all
    /// (flash, three-stage and reference).
    #[arg(long, default_value = "all", value_parser = parse_kernels)]
    kernel: KernelList,
    /// Minimum measured time per case and kernel, in seconds; runs repeat until both this and
    /// --min-runs are reached.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, allow_negative_numbers = true,
          value_parser = parse_seconds)]
    min_time: f64,
    /// Minimum number of measured runs per case and kernel, not counting the warm-up run.
    #[arg(long, value_name = "RUNS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    min_runs: u32,
    /// Run only the cases whose label contains this text (e.g. `q1024`, `causal`, `d128`).
    #[arg(long, value_name = "TEXT")]
    filter: Option<String>,
    /// Print one JSON object per case and kernel instead of a table. Its fields are case,
    /// batch, heads, kv_heads, seq_q, seq_kv, head_dim, causal, dtype, kernel (the program
    /// that ran), requested_kernel, status, message, median_ms, min_ms, max_ms, first_call_ms,
    /// runs, min_runs and min_time_s (the settings that stopped the runs), timing
    /// (`gpu-timestamps`, or `wall-clock` for the host clock), gflops, gbps,
    /// runs_on (adapter, or host for the reference), adapter, backend, driver, driver_info,
    /// vendor_id, device_id and crate_version. Host-clock times also count the submission and
    /// any zero-fill that wgpu adds, so compare rows of one timing.
    #[arg(long)]
    json: bool,
    /// Adapter: a part of its name or a backend (vulkan, metal, dx12, gl). Defaults to
    /// WGPU_ATTENTION_ADAPTER, then to the best adapter found.
    #[arg(long)]
    adapter: Option<String>,
}

/// One thing `bench` can time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BenchKernel {
    Gpu(Kernel),
    /// The f64 CPU reference.
    Reference,
}

impl BenchKernel {
    fn name(self) -> &'static str {
        match self {
            BenchKernel::Gpu(kernel) => kernel.name(),
            BenchKernel::Reference => "reference",
        }
    }
}

/// The kernels named by `--kernel`, in order and without repeats.
#[derive(Clone, Debug)]
struct KernelList(Vec<BenchKernel>);

fn parse_kernels(text: &str) -> Result<KernelList, String> {
    let mut kernels = Vec::new();
    for name in text.split(',').map(str::trim) {
        if name.is_empty() {
            return Err(format!(
                "`{text}` has an empty kernel name; expected {KERNEL_CHOICES}, comma-separated"
            ));
        }
        let named: &[BenchKernel] = match name {
            "all" => &[
                BenchKernel::Gpu(Kernel::Flash),
                BenchKernel::Gpu(Kernel::ThreeStage),
                BenchKernel::Reference,
            ],
            "reference" => &[BenchKernel::Reference],
            _ => match Kernel::from_name(name) {
                Some(kernel) => &[BenchKernel::Gpu(kernel)],
                None => {
                    return Err(format!(
                        "unknown kernel `{name}`; expected {KERNEL_CHOICES}, comma-separated"
                    ));
                }
            },
        };
        for &kernel in named {
            if !kernels.contains(&kernel) {
                kernels.push(kernel);
            }
        }
    }
    Ok(KernelList(kernels))
}

fn parse_shape(text: &str) -> Result<AttentionShape, String> {
    const NAMES: [&str; 6] = ["B", "H", "HKV", "SQ", "SKV", "D"];
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    if parts.len() != NAMES.len() {
        let count = parts.len();
        let noun = if count == 1 { "value" } else { "values" };
        return Err(format!(
            "`{text}` has {count} comma-separated {noun} but a shape needs 6: B,H,HKV,SQ,SKV,D \
             (batch, query heads, key/value heads, query rows, key/value rows, head dim), e.g. \
             1,8,8,1024,1024,64"
        ));
    }
    let mut values = [0usize; 6];
    for ((value, part), name) in values.iter_mut().zip(&parts).zip(NAMES) {
        *value = part.parse().map_err(|error: std::num::ParseIntError| {
            if *error.kind() == std::num::IntErrorKind::PosOverflow {
                format!(
                    "{name} = `{part}` is too large; pass at most {}",
                    usize::MAX
                )
            } else {
                format!("{name} = `{part}` is not a positive integer")
            }
        })?;
    }
    let [batch, heads, kv_heads, seq_q, seq_kv, head_dim] = values;
    let shape = AttentionShape::new(batch, heads, seq_q, seq_kv, head_dim).with_kv_heads(kv_heads);
    AttentionProblem::new(shape)
        .validate()
        .map_err(|error| error.to_string())?;
    Ok(shape)
}

/// Parses a causal alignment, with `-` accepted for `_` (`top-left` as `top_left`), as kernel
/// names and case labels use dashes.
fn parse_causal(text: &str) -> Result<Causal, String> {
    Causal::from_name(&text.replace('-', "_")).ok_or_else(|| {
        format!("unknown causal masking `{text}`; expected none, top_left or bottom_right")
    })
}

fn parse_dtype(text: &str) -> Result<Dtype, String> {
    Dtype::from_name(text).ok_or_else(|| format!("unknown dtype `{text}`; expected f32 or f16"))
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Ok(seconds),
        _ => Err(format!("`{text}` is not a number of seconds >= 0")),
    }
}

/// Builds the default grid: long self-attention with and without a causal mask, a
/// sentence-encoder batch, and decoding steps over a grouped-query KV cache.
fn default_grid() -> Vec<AttentionProblem> {
    let mut cases = Vec::new();
    for seq in [512, 1024, 2048, 4096] {
        let shape = AttentionShape::new(1, 8, seq, seq, 64);
        cases.push(AttentionProblem::new(shape));
        cases.push(AttentionProblem::new(shape).with_causal(Causal::TopLeft));
    }
    // A batch of sentences through all-MiniLM-L6-v2 (12 heads of dim 32).
    let encoder_batch = AttentionShape::new(4, 12, 128, 128, 32);
    cases.push(AttentionProblem::new(encoder_batch));
    // One decoding step: one query, 32 query heads sharing 8 key/value heads.
    for seq_kv in [4096, 16384] {
        let shape = AttentionShape::new(1, 32, 1, seq_kv, 128).with_kv_heads(8);
        cases.push(AttentionProblem::new(shape));
    }
    cases
}

/// Returns the cases that `--shape`, `--causal` and `--filter` select, or an error message when
/// `--filter` matches none.
fn select_cases(args: &BenchArgs) -> Result<Vec<AttentionProblem>, String> {
    let mut cases = match args.shape {
        Some(shape) => {
            let causal = args.causal.unwrap_or_default();
            vec![AttentionProblem::new(shape).with_causal(causal)]
        }
        None => default_grid(),
    };
    for case in &mut cases {
        *case = case.with_dtype(args.dtype);
    }
    let Some(filter) = &args.filter else {
        return Ok(cases);
    };
    let labels: Vec<String> = cases.iter().map(AttentionProblem::label).collect();
    let selected: Vec<AttentionProblem> = cases
        .into_iter()
        .filter(|case| case.label().contains(filter.as_str()))
        .collect();
    if selected.is_empty() {
        return Err(format!(
            "no case label contains `{filter}`; the labels are: {}",
            labels.join(", ")
        ));
    }
    Ok(selected)
}

/// Settings shared by every measurement.
#[derive(Clone, Copy, Debug)]
struct RepeatSettings {
    min_time: Duration,
    min_runs: u32,
}

/// Clock that measured the run times of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timing {
    /// Timestamps written by the GPU before and after the recorded kernels.
    GpuTimestamps,
    /// Host clock: from submit until the device is idle, or around the reference call.
    WallClock,
}

impl Timing {
    fn name(self) -> &'static str {
        match self {
            Timing::GpuTimestamps => "gpu-timestamps",
            Timing::WallClock => "wall-clock",
        }
    }
}

/// The times of one run.
#[derive(Clone, Copy, Debug)]
struct RunTime {
    /// The time reported for the run, measured with the row's [`Timing`].
    measured: Duration,
    /// Host time of the whole run, from recording (pipeline compilation included) to completion.
    total: Duration,
}

/// The result of timing one kernel on one case.
#[derive(Clone, Copy, Debug)]
struct Measurement {
    median: Duration,
    /// The fastest and slowest measured runs.
    min: Duration,
    max: Duration,
    first_call: Duration,
    runs: usize,
    timing: Timing,
}

#[derive(Debug)]
enum Outcome {
    Ok(Measurement),
    /// The kernel rejected the case, with the library's message.
    Unsupported(String),
    /// The case was left out on purpose, with the reason.
    Skipped(String),
    /// Anything else went wrong, with the message.
    Failed(String),
}

impl Outcome {
    fn status(&self) -> &'static str {
        match self {
            Outcome::Ok(_) => "ok",
            Outcome::Unsupported(_) => "unsupported",
            Outcome::Skipped(_) => "skipped",
            Outcome::Failed(_) => "error",
        }
    }

    fn message(&self) -> Option<&str> {
        match self {
            Outcome::Ok(_) => None,
            Outcome::Unsupported(message)
            | Outcome::Skipped(message)
            | Outcome::Failed(message) => Some(message),
        }
    }

    fn from_error(error: &Error) -> Self {
        match error {
            Error::Unsupported { .. } | Error::ExceedsLimit { .. } => {
                Outcome::Unsupported(error.to_string())
            }
            Error::MissingFeature { feature, what, .. } => Outcome::Unsupported(format!(
                "{what} needs the device feature {feature}, which this adapter lacks; use \
                 --dtype f32, or an adapter that has it (see `wgpu-attention info`)"
            )),
            _ => Outcome::Failed(error.to_string()),
        }
    }
}

/// One line of the report.
struct Row<'a> {
    problem: &'a AttentionProblem,
    requested: BenchKernel,
    /// The kernel that ran: `auto` resolved to the kernel it picks for this case.
    kernel_name: &'static str,
    outcome: Outcome,
}

pub(crate) fn run(args: &BenchArgs) -> Result<ExitCode, Error> {
    let cases = match select_cases(args) {
        Ok(cases) => cases,
        Err(message) => {
            eprintln!("error: {message}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let context = crate::open_context(args.adapter.as_deref())?;
    let session = Session {
        context: &context,
        settings: RepeatSettings {
            min_time: Duration::from_secs_f64(args.min_time),
            min_runs: args.min_runs,
        },
        timer: TimestampQueries::new(&context),
        kernels: &args.kernel.0,
        json: args.json,
        table: Table::new(&cases),
        progress: progress_bar(cases.len() * args.kernel.0.len()),
    };

    if !session.json {
        session.progress.suspend(|| session.table.print_header());
    }
    let (mut failed, mut measured, mut measured_gpu) = (false, 0, 0);
    for (index, problem) in cases.iter().enumerate() {
        let summary = session.run_case(index, problem);
        failed |= summary.failed;
        measured += summary.measured;
        measured_gpu += summary.measured_gpu;
    }
    session.progress.finish_and_clear();
    let gpu_requested = args
        .kernel
        .0
        .iter()
        .any(|k| matches!(k, BenchKernel::Gpu(_)));
    if !session.json {
        let reference = args.kernel.0.contains(&BenchKernel::Reference);
        print_footer(&context, session.gpu_timing(), gpu_requested, reference);
    }
    // Every row gives the reason its kernel did not run. A run that timed nothing fails, and so
    // does one that timed only the reference when GPU kernels were requested, so that a script
    // looping over adapters notices an adapter that ran none of them.
    if measured == 0 {
        eprintln!(
            "error: no kernel ran on any case; see each row's reason, and pick another --adapter, \
             --shape, --kernel or --dtype"
        );
        failed = true;
    } else if gpu_requested && measured_gpu == 0 {
        eprintln!(
            "error: no GPU kernel ran on any case, only the reference; see each row's reason, and \
             pick another --adapter, --shape, --kernel or --dtype"
        );
        failed = true;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// State shared by every case of one `bench` invocation.
/// Outcome counts of the kernels of one case.
#[derive(Default)]
struct CaseSummary {
    /// Whether any kernel failed with an error other than rejecting the case.
    failed: bool,
    /// Kernels that ran and were timed.
    measured: usize,
    /// GPU kernels among them.
    measured_gpu: usize,
}

struct Session<'a> {
    context: &'a Context,
    settings: RepeatSettings,
    /// Present when the device can write timestamps inside an encoder.
    timer: Option<TimestampQueries>,
    kernels: &'a [BenchKernel],
    json: bool,
    table: Table,
    progress: ProgressBar,
}

impl Session<'_> {
    fn gpu_timing(&self) -> Timing {
        if self.timer.is_some() {
            Timing::GpuTimestamps
        } else {
            Timing::WallClock
        }
    }

    /// Times every selected kernel on case number `index` and prints a row for each.
    fn run_case(&self, index: usize, problem: &AttentionProblem) -> CaseSummary {
        // The inputs are drawn on first use, after the checks that can reject the case, so that
        // a shape too large for the device or the reference is reported before any memory is
        // allocated for it.
        let host_cell = std::cell::OnceCell::new();
        let host = || host_cell.get_or_init(|| OwnedInputs::random(problem, index as u64));
        // Uploaded on first use, so a run of the reference alone needs no device memory.
        let mut device: Option<wgpu_attention::Result<DeviceTensors>> = None;
        let mut summary = CaseSummary::default();
        for &kernel in self.kernels {
            let label = format!("{} {}", problem.label(), kernel.name());
            self.progress.set_message(label);
            let outcome = match kernel {
                BenchKernel::Gpu(gpu_kernel) => {
                    let tensors = device.get_or_insert_with(|| {
                        DeviceTensors::check_sizes(self.context, problem)?;
                        DeviceTensors::upload(self.context, problem, host())
                    });
                    match tensors {
                        Ok(tensors) => self.time_gpu_kernel(gpu_kernel, problem, tensors),
                        Err(error) => Outcome::from_error(error),
                    }
                }
                BenchKernel::Reference => time_reference(problem, host, self.settings),
            };
            summary.failed |= matches!(outcome, Outcome::Failed(_));
            let timed = usize::from(matches!(outcome, Outcome::Ok(_)));
            summary.measured += timed;
            if matches!(kernel, BenchKernel::Gpu(_)) {
                summary.measured_gpu += timed;
            }
            self.print_row(&Row {
                problem,
                requested: kernel,
                kernel_name: resolved_name(kernel, problem, self.context),
                outcome,
            });
            self.progress.inc(1);
        }
        summary
    }

    /// Times `kernel` on `problem`: a warm-up run, then measured runs.
    fn time_gpu_kernel(
        &self,
        kernel: Kernel,
        problem: &AttentionProblem,
        tensors: &DeviceTensors,
    ) -> Outcome {
        let result = repeat_runs(self.settings, || {
            run_gpu_once(self.context, kernel, problem, tensors, self.timer.as_ref())
        });
        match result {
            Ok((first_call, samples)) => {
                Outcome::Ok(summarize(first_call, samples, self.gpu_timing()))
            }
            Err(error) => Outcome::from_error(&error),
        }
    }

    fn print_row(&self, row: &Row<'_>) {
        self.progress.suspend(|| {
            if self.json {
                println!("{}", row_json(row, self.context, self.settings));
            } else {
                self.table.print_row(row);
            }
        });
    }
}

fn resolved_name(
    kernel: BenchKernel,
    problem: &AttentionProblem,
    context: &Context,
) -> &'static str {
    match kernel {
        BenchKernel::Gpu(gpu_kernel) => gpu_kernel.resolve(problem, context).name(),
        BenchKernel::Reference => kernel.name(),
    }
}

/// Creates a progress bar on stderr. indicatif draws nothing when stderr is not a terminal.
fn progress_bar(total: usize) -> ProgressBar {
    let style = ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}] {msg}")
        .expect("the progress bar template is valid");
    ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr())
        .with_style(style)
}

/// Device buffers of one case, uploaded once before any run.
struct DeviceTensors {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    out: wgpu::Buffer,
    lse: wgpu::Buffer,
}

impl DeviceTensors {
    /// Uploads the inputs in the problem's dtype and creates the outputs, returning wgpu's error
    /// if any buffer fails.
    /// Checks that the case's tensors fit the device's largest buffer, before their host data
    /// is drawn.
    fn check_sizes(context: &Context, problem: &AttentionProblem) -> wgpu_attention::Result<()> {
        problem.validate()?;
        let shape = &problem.shape;
        let element_bytes = problem.dtype.bytes() as u64;
        let max_buffer_size = context.limits().max_buffer_size;
        let tensors = [
            ("q", shape.q_len()),
            ("k", shape.k_len()),
            ("v", shape.v_len()),
            ("out", shape.out_len()),
        ];
        for (tensor, elements) in tensors {
            let bytes = element_bytes.saturating_mul(elements as u64);
            if bytes > max_buffer_size {
                return Err(Error::ExceedsLimit {
                    what: format!("tensor `{tensor}` ({elements} values of {element_bytes} bytes)"),
                    value: bytes,
                    limit_name: "max_buffer_size",
                    limit: max_buffer_size,
                    fix: "use a smaller shape",
                });
            }
        }
        Ok(())
    }

    fn upload(
        context: &Context,
        problem: &AttentionProblem,
        host: &OwnedInputs,
    ) -> wgpu_attention::Result<Self> {
        let device = context.device();
        let shape = &problem.shape;
        let element_bytes = problem.dtype.bytes() as u64;
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out_of_memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let input = |label: &str, data: &[f32]| {
            let f16_data: Vec<half::f16>;
            let contents: &[u8] = match problem.dtype {
                Dtype::F32 => bytemuck::cast_slice(data),
                Dtype::F16 => {
                    f16_data = data.iter().copied().map(half::f16::from_f32).collect();
                    bytemuck::cast_slice(&f16_data)
                }
            };
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage: wgpu::BufferUsages::STORAGE,
            })
        };
        let output = |label: &str, bytes: u64| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let tensors = Self {
            q: input("bench q", &host.q),
            k: input("bench k", &host.k),
            v: input("bench v", &host.v),
            out: output("bench out", element_bytes * shape.out_len() as u64),
            lse: output("bench lse", 4 * shape.lse_len() as u64),
        };
        check_error_scopes(validation, out_of_memory, "uploading the bench inputs")?;
        Ok(tensors)
    }

    fn tensors(&self) -> GpuTensors<'_> {
        GpuTensors {
            lse: Some(&self.lse),
            ..GpuTensors::new(&self.q, &self.k, &self.v, &self.out)
        }
    }
}

/// Pops the two error scopes, innermost first, and returns the first error either caught.
fn check_error_scopes(
    validation: wgpu::ErrorScopeGuard,
    out_of_memory: wgpu::ErrorScopeGuard,
    during: &'static str,
) -> wgpu_attention::Result<()> {
    let out_of_memory = pollster::block_on(out_of_memory.pop());
    let validation = pollster::block_on(validation.pop());
    match out_of_memory.or(validation) {
        Some(source) => Err(Error::Device { during, source }),
        None => Ok(()),
    }
}

/// A query set of two timestamps with the buffers to read them back.
struct TimestampQueries {
    query_set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    staging: wgpu::Buffer,
    /// Nanoseconds per timestamp tick.
    period_ns: f64,
}

impl TimestampQueries {
    /// Returns `None` unless the device can write timestamps between commands of an encoder.
    fn new(context: &Context) -> Option<Self> {
        let needed =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        let period_ns = f64::from(context.queue().get_timestamp_period());
        if !context.features().contains(needed) || period_ns <= 0.0 {
            return None;
        }
        let device = context.device();
        let size = 2 * u64::from(wgpu::QUERY_SIZE);
        let query_set = device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("bench timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let buffer = |label: &str, usage: wgpu::BufferUsages| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        let resolve = buffer(
            "bench timestamps resolve",
            wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        );
        let staging = buffer(
            "bench timestamps read-back",
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        Some(Self {
            query_set,
            resolve,
            staging,
            period_ns,
        })
    }

    /// Records the copy of both timestamps into the read-back buffer; call after the second
    /// timestamp.
    fn record_resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(&self.query_set, 0..2, &self.resolve, 0);
        encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.staging, 0, self.staging.size());
    }

    /// Reads both timestamps back after the submission finished and returns the time between
    /// them.
    fn read_elapsed(&self, device: &wgpu::Device) -> wgpu_attention::Result<Duration> {
        let slice = self.staging.slice(..);
        let (sender, receiver) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |result| {
            // A failed send only means that this function already returned an error.
            let _ = sender.send(result);
        });
        wait_for_device(device)?;
        receiver
            .recv()
            .map_err(|error| Error::ReadBack(error.to_string()))?
            .map_err(|error| Error::ReadBack(error.to_string()))?;
        let view = slice
            .get_mapped_range()
            .map_err(|error| Error::ReadBack(error.to_string()))?;
        let [start, end]: [u64; 2] = bytemuck::pod_read_unaligned(&view[..16]);
        drop(view);
        self.staging.unmap();
        // wgpu does not promise that timestamps are ordered with the commands around them, so a
        // reversed pair is reported instead of being read as a huge or negative time.
        let ticks = end.checked_sub(start).ok_or_else(|| {
            Error::ReadBack(format!(
                "the end timestamp ({end}) is before the start timestamp ({start}), probably \
                 because the driver reordered them with the kernels; rerun to measure again"
            ))
        })?;
        Ok(Duration::from_secs_f64(
            ticks as f64 * self.period_ns * 1e-9,
        ))
    }
}

/// Blocks until every submission on the device has finished.
fn wait_for_device(device: &wgpu::Device) -> wgpu_attention::Result<()> {
    device
        .poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: None,
        })
        .map_err(|error| Error::ReadBack(error.to_string()))?;
    Ok(())
}

/// Records `kernel` into a new encoder, submits it and waits for the device.
///
/// With `timer`, the measured time is the GPU time between timestamps written just before and
/// just after the kernel's dispatches. Without it, the measured time runs from submit until the
/// device is idle, so it also covers the zero-fill that wgpu adds before the first use of the
/// scratch buffers that `record` creates on each call.
fn run_gpu_once(
    context: &Context,
    kernel: Kernel,
    problem: &AttentionProblem,
    tensors: &DeviceTensors,
    timer: Option<&TimestampQueries>,
) -> wgpu_attention::Result<RunTime> {
    let device = context.device();
    let started = Instant::now();
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let out_of_memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("bench"),
    });
    if let Some(timer) = timer {
        encoder.write_timestamp(&timer.query_set, 0);
    }
    context.record(kernel, problem, &mut encoder, &tensors.tensors())?;
    if let Some(timer) = timer {
        encoder.write_timestamp(&timer.query_set, 1);
        timer.record_resolve(&mut encoder);
    }
    let commands = encoder.finish();

    let submitted = Instant::now();
    context.queue().submit([commands]);
    wait_for_device(device)?;
    let wall_clock = submitted.elapsed();
    check_error_scopes(validation, out_of_memory, "a bench run")?;
    let measured = match timer {
        Some(timer) => timer.read_elapsed(device)?,
        None => wall_clock,
    };
    Ok(RunTime {
        measured,
        total: started.elapsed(),
    })
}

/// Times the f64 CPU reference on the inputs that `host` draws, or skips it when one run would
/// take longer than [`REFERENCE_MAX_SECONDS`] by the estimate of [`reference_seconds_estimate`].
fn time_reference<'a>(
    problem: &AttentionProblem,
    host: impl FnOnce() -> &'a OwnedInputs,
    settings: RepeatSettings,
) -> Outcome {
    let estimate = reference_seconds_estimate(problem);
    if estimate > REFERENCE_MAX_SECONDS {
        return Outcome::Skipped(format!(
            "one reference run would take about {estimate:.0} s (estimated at {:.0} GFLOP/s), \
             over the {REFERENCE_MAX_SECONDS:.0} s limit",
            REFERENCE_FLOPS_PER_SECOND / 1e9
        ));
    }
    let inputs = host().inputs();
    let result = repeat_runs(settings, || {
        let started = Instant::now();
        let output = reference::attention(problem, &inputs)?;
        let elapsed = started.elapsed();
        std::hint::black_box(output);
        Ok(RunTime {
            measured: elapsed,
            total: elapsed,
        })
    });
    match result {
        Ok((first_call, samples)) => Outcome::Ok(summarize(first_call, samples, Timing::WallClock)),
        Err(error) => Outcome::from_error(&error),
    }
}

/// Estimated seconds of one [`reference::attention`] call.
///
/// The reference computes every score, causal or not, and skips masked keys only in the
/// probabilities-times-values product. So its work is the unmasked score product plus the
/// value product over the pairs that [`AttentionProblem::flops`] counts.
fn reference_seconds_estimate(problem: &AttentionProblem) -> f64 {
    let shape = &problem.shape;
    let (head_dim, head_dim_v) = (shape.head_dim as f64, shape.head_dim_v as f64);
    let unmasked = problem.with_causal(Causal::None).flops();
    let scores = unmasked * head_dim / (head_dim + head_dim_v);
    let values = problem.flops() * head_dim_v / (head_dim + head_dim_v);
    (scores + values) / REFERENCE_FLOPS_PER_SECOND
}

/// Runs `run_once` once as a warm-up, then until both `settings.min_time` has passed and
/// `settings.min_runs` runs are done. Returns the warm-up run's total time and the measured
/// times.
fn repeat_runs(
    settings: RepeatSettings,
    mut run_once: impl FnMut() -> wgpu_attention::Result<RunTime>,
) -> wgpu_attention::Result<(Duration, Vec<Duration>)> {
    let first_call = run_once()?.total;
    let mut samples = Vec::new();
    let started = Instant::now();
    while samples.len() < settings.min_runs as usize || started.elapsed() < settings.min_time {
        samples.push(run_once()?.measured);
    }
    Ok((first_call, samples))
}

fn summarize(first_call: Duration, mut samples: Vec<Duration>, timing: Timing) -> Measurement {
    samples.sort_unstable();
    let middle = samples.len() / 2;
    let median = if samples.len().is_multiple_of(2) {
        (samples[middle - 1] + samples[middle]) / 2
    } else {
        samples[middle]
    };
    Measurement {
        median,
        min: samples[0],
        max: samples[samples.len() - 1],
        first_call,
        runs: samples.len(),
        timing,
    }
}

/// Throughput of a measured row: (GFLOP/s, GB/s).
fn throughput(problem: &AttentionProblem, median: Duration) -> (f64, f64) {
    let seconds = median.as_secs_f64();
    let gflops = problem.flops() / seconds / 1e9;
    let gbps = problem.io_bytes() as f64 / seconds / 1e9;
    (gflops, gbps)
}

/// The text table, with the case column as wide as the longest label.
struct Table {
    case_width: usize,
}

impl Table {
    /// Fits `flash (flash-tiled)`, the longest requested and resolved pair.
    const KERNEL_WIDTH: usize = 21;

    fn new(cases: &[AttentionProblem]) -> Self {
        let case_width = cases
            .iter()
            .map(|case| case.label().len())
            .max()
            .unwrap_or(0)
            .max("case".len());
        Self { case_width }
    }

    fn print_header(&self) {
        println!(
            "{:<cw$}  {:<kw$}  {:>10}  {:>9}  {:>8}  {:>13}",
            "case",
            "kernel",
            "median ms",
            "GFLOP/s",
            "GB/s",
            "first call ms",
            cw = self.case_width,
            kw = Self::KERNEL_WIDTH,
        );
    }

    fn print_row(&self, row: &Row<'_>) {
        // `auto` and `flash` show the kernel they resolved to, so repeated rows stay apart.
        let requested = row.requested.name();
        let kernel = if requested == row.kernel_name {
            requested.to_string()
        } else {
            format!("{requested} ({})", row.kernel_name)
        };
        let prefix = format!(
            "{:<cw$}  {:<kw$}",
            row.problem.label(),
            kernel,
            cw = self.case_width,
            kw = Self::KERNEL_WIDTH,
        );
        match &row.outcome {
            Outcome::Ok(measurement) => {
                let (gflops, gbps) = throughput(row.problem, measurement.median);
                println!(
                    "{prefix}  {:>10.3}  {:>9.2}  {:>8.3}  {:>13.1}",
                    measurement.median.as_secs_f64() * 1e3,
                    gflops,
                    gbps,
                    measurement.first_call.as_secs_f64() * 1e3,
                );
            }
            other => println!(
                "{prefix}  {}: {}",
                other.status(),
                other.message().unwrap_or_default()
            ),
        }
    }
}

/// Prints the adapter and how the requested kernels were timed: GPU kernels by `gpu_timing`,
/// the reference by the host clock.
fn print_footer(context: &Context, gpu_timing: Timing, gpu: bool, reference: bool) {
    println!();
    let info = context.adapter_info();
    println!(
        "adapter: {}, driver: {}",
        crate::adapter_label(context),
        crate::driver_label(info)
    );
    let gpu_clock = match gpu_timing {
        Timing::GpuTimestamps => "GPU timestamps around the recorded kernels",
        Timing::WallClock => {
            "host clock from submit to device idle (the device lacks \
             TIMESTAMP_QUERY_INSIDE_ENCODERS)"
        }
    };
    match (gpu, reference) {
        (true, true) => println!("GPU kernel times: {gpu_clock}; reference times: host clock"),
        (true, false) => println!("GPU kernel times: {gpu_clock}"),
        (false, _) => println!("reference times: host clock"),
    }
    println!(
        "first call ms: the warm-up run, including recording and any pipeline compilation it \
         triggered"
    );
}

fn row_json(row: &Row<'_>, context: &Context, settings: RepeatSettings) -> serde_json::Value {
    let shape = &row.problem.shape;
    let info = context.adapter_info();
    let measurement = match &row.outcome {
        Outcome::Ok(measurement) => Some(measurement),
        _ => None,
    };
    let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
    let rates = measurement.map(|m| throughput(row.problem, m.median));
    json!({
        "case": row.problem.label(),
        "batch": shape.batch,
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "seq_q": shape.seq_q,
        "seq_kv": shape.seq_kv,
        "head_dim": shape.head_dim,
        "causal": row.problem.causal.name(),
        "dtype": row.problem.dtype.name(),
        "kernel": row.kernel_name,
        "requested_kernel": row.requested.name(),
        "status": row.outcome.status(),
        "message": row.outcome.message(),
        "median_ms": measurement.map(|m| ms(m.median)),
        "min_ms": measurement.map(|m| ms(m.min)),
        "max_ms": measurement.map(|m| ms(m.max)),
        "gflops": rates.map(|(gflops, _)| gflops),
        "gbps": rates.map(|(_, gbps)| gbps),
        "first_call_ms": measurement.map(|m| ms(m.first_call)),
        "runs": measurement.map_or(0, |m| m.runs),
        "min_runs": settings.min_runs,
        "min_time_s": settings.min_time.as_secs_f64(),
        "timing": measurement.map(|m| m.timing.name()),
        // The reference runs on the host CPU; the adapter fields still name the run's adapter.
        "runs_on": if row.requested == BenchKernel::Reference { "host" } else { "adapter" },
        "adapter": info.name.as_str(),
        "vendor_id": info.vendor,
        "device_id": info.device,
        "backend": wgpu_attention::backend_name(info.backend),
        "driver": crate::driver_name(info),
        "driver_info": info.driver_info.as_str(),
        "crate_version": env!("CARGO_PKG_VERSION"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_feature_is_unsupported() {
        let error = Error::MissingFeature {
            feature: "SHADER_F16",
            what: "keeping f16 tensors in GPU buffers",
            fix: "convert the tensors to f32",
        };
        let outcome = Outcome::from_error(&error);
        assert_eq!(outcome.status(), "unsupported");
        let message = outcome.message().unwrap();
        assert!(message.contains("SHADER_F16"), "{message}");
        assert!(message.contains("--dtype f32"), "{message}");
    }

    #[test]
    fn causal_takes_dashes_or_underscores() {
        assert_eq!(parse_causal("top-left"), Ok(Causal::TopLeft));
        assert_eq!(parse_causal("bottom_right"), Ok(Causal::BottomRight));
        assert!(parse_causal("sideways").is_err());
    }

    /// Asserts that a parser rejected its text with a message that contains `part`.
    fn assert_rejected<T>(result: Result<T, String>, part: &str) {
        match result {
            Ok(_) => panic!("the text was accepted; expected a message with `{part}`"),
            Err(message) => assert!(message.contains(part), "{message}"),
        }
    }

    #[test]
    fn kernel_list_rejects_empty_name() {
        assert_rejected(parse_kernels("flash,"), "`flash,` has an empty kernel name");
    }

    #[test]
    fn shape_counts_one_value() {
        assert_rejected(
            parse_shape("1x32x8x1x4096x128"),
            "has 1 comma-separated value but",
        );
    }
}
