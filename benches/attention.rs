//! Criterion benchmarks of the GPU kernels against the f64 CPU reference.
//!
//! Each benchmark sets its throughput to [`AttentionProblem::flops`], so the "elem/s" that
//! criterion prints is FLOP/s here.
//!
//! The GPU benchmarks time submitting recorded work on buffers that are already on the device and
//! waiting for it to finish, so uploads and read-backs are excluded. Only
//! `gpu-three-stage-with-transfers` times the whole host-slice call, including both transfers.
//!
//! Run with `cargo bench --bench attention`, or pass a filter such as `-- gpu-three-stage/` to run
//! part of it. The adapter is chosen as [`Context::new`] chooses it, so `WGPU_ATTENTION_ADAPTER`
//! selects one.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use wgpu::util::DeviceExt;
use wgpu_attention::{
    AttentionProblem, AttentionShape, Causal, Context, GpuTensors, Kernel, OwnedInputs, reference,
};

/// Base seed of the input generator: case `i` uses `SEED + i`, so every run benchmarks the same
/// values.
const SEED: u64 = 0x5eed_a77e;

/// One benchmarked problem.
struct Case {
    problem: AttentionProblem,
    /// Whether to benchmark the f64 reference too. Its time grows with `B·H·Sq·Skv·D` (this
    /// bench measured 0.15 s for the 512 × 512 case on a 2-core x86 machine), so keep it off for
    /// shapes where one iteration would take more than about a second.
    with_reference: bool,
}

fn cases() -> Vec<Case> {
    // Sentence-embedding encoder in the style of MiniLM: short sequences in a batch.
    let encoder_batch = AttentionProblem::new(AttentionShape::new(4, 12, 128, 128, 32));
    let long = AttentionShape::new(1, 8, 512, 512, 64);
    // One decoding step: a single query over a 1024-entry key/value cache, with 32 query heads
    // sharing 8 key/value heads. 1024 keys keeps the fused kernel under llvmpipe's loop cap
    // (`LLVMPIPE_MAX_LOOP_ITERATIONS`), so both kernels run on lavapipe.
    // NOTE: the three-stage kernels compute 64-row query tiles, so with one query 63 of 64 rows
    // are padding, and on lavapipe this case takes seconds per iteration. The fused kernel
    // shrinks its block to 4 rows here.
    let decode = AttentionShape::new(1, 32, 1, 1024, 128).with_kv_heads(8);
    vec![
        Case {
            problem: encoder_batch,
            with_reference: true,
        },
        Case {
            problem: AttentionProblem::new(long),
            with_reference: true,
        },
        Case {
            problem: AttentionProblem::new(long).with_causal(Causal::TopLeft),
            with_reference: true,
        },
        Case {
            problem: AttentionProblem::new(decode),
            with_reference: true,
        },
    ]
}

/// Device buffers of one problem, uploaded once before timing starts.
struct DeviceTensors {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    out: wgpu::Buffer,
    lse: wgpu::Buffer,
}

impl DeviceTensors {
    fn upload(context: &Context, shape: &AttentionShape, host: &OwnedInputs) -> Self {
        let device = context.device();
        let input = |label: &str, data: &[f32]| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::STORAGE,
            })
        };
        let output = |label: &str, elements: usize| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 4 * elements as u64,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        Self {
            q: input("bench q", &host.q),
            k: input("bench k", &host.k),
            v: input("bench v", &host.v),
            out: output("bench out", shape.q_len()),
            lse: output("bench lse", shape.lse_len()),
        }
    }

    fn tensors(&self) -> GpuTensors<'_> {
        // Passing the buffer keeps `record` from allocating a log-sum-exp scratch per call.
        GpuTensors::new(&self.q, &self.k, &self.v, &self.out).with_lse(&self.lse)
    }
}

/// Blocks until every submission on the device has finished.
fn wait_for_device(context: &Context) {
    context
        .device()
        .poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: None,
        })
        .expect("waiting for the device failed");
}

/// Runs `kernel` on `problem` `iterations` times and returns the time spent from each submit
/// until the device is idle.
///
/// Recording stays outside the clock. `record` creates its score scratch buffer, uniforms and
/// bind groups on each call, which is host work, not kernel time. The submit does include the
/// zero-fill that wgpu (30) adds before the first use of that fresh scratch buffer.
fn time_recorded(
    context: &Context,
    kernel: Kernel,
    problem: &AttentionProblem,
    buffers: &DeviceTensors,
    iterations: u64,
) -> Duration {
    let device = context.device();
    let tensors = buffers.tensors();
    let mut elapsed = Duration::ZERO;
    for _ in 0..iterations {
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("bench"),
        });
        context
            .record(kernel, problem, &mut encoder, &tensors)
            .unwrap_or_else(|error| panic!("recording {} failed: {error}", problem.label()));
        let commands = encoder.finish();

        let start = Instant::now();
        context.queue().submit([commands]);
        wait_for_device(context);
        elapsed += start.elapsed();
    }
    elapsed
}

/// Returns the host time of `iterations` calls of `record`, each from creating an encoder to
/// finishing it. Each command buffer is then submitted and waited for outside the clock, as in a
/// decoding loop. Command buffers dropped unsubmitted made later recordings slower and slower
/// here, as wgpu kept tracking their resources.
fn time_host(
    context: &Context,
    iterations: u64,
    mut record: impl FnMut(&mut wgpu::CommandEncoder),
) -> Duration {
    let mut elapsed = Duration::ZERO;
    for _ in 0..iterations {
        let start = Instant::now();
        let mut encoder =
            context
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("bench"),
                });
        record(&mut encoder);
        let commands = encoder.finish();
        elapsed += start.elapsed();
        context.queue().submit([commands]);
        wait_for_device(context);
    }
    elapsed
}

/// Measures the host work per call that a decoding loop pays on every token, with the pipelines
/// already compiled. `record` checks the call and creates its uniforms and bind groups each
/// time, and a [`wgpu_attention::PreparedAttention`] only encodes what `prepare` built.
fn bench_host(c: &mut Criterion) {
    let context = Context::new()
        .unwrap_or_else(|error| panic!("cannot create a wgpu context for the benchmarks: {error}"));
    let mut group = c.benchmark_group("host");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));
    for (index, case) in cases().iter().enumerate() {
        let problem = &case.problem;
        let label = problem.label();
        let host = OwnedInputs::random(problem, SEED + index as u64);
        let buffers = DeviceTensors::upload(&context, &problem.shape, &host);
        let tensors = buffers.tensors();
        let prepared = context
            .prepare(Kernel::Flash, problem, &tensors)
            .unwrap_or_else(|error| panic!("preparing {label} failed: {error}"));
        time_host(&context, 1, |encoder| prepared.record(encoder));
        group.bench_function(BenchmarkId::new("record-flash", &label), |b| {
            b.iter_custom(|iterations| {
                time_host(&context, iterations, |encoder| {
                    context
                        .record(Kernel::Flash, problem, encoder, &tensors)
                        .unwrap_or_else(|error| panic!("recording {label} failed: {error}"));
                })
            });
        });
        group.bench_function(BenchmarkId::new("prepared-flash", &label), |b| {
            b.iter_custom(|iterations| {
                time_host(&context, iterations, |encoder| prepared.record(encoder))
            });
        });
    }
    group.finish();
}

fn bench_attention(c: &mut Criterion) {
    let context = Context::new()
        .unwrap_or_else(|error| panic!("cannot create a wgpu context for the benchmarks: {error}"));
    let info = context.adapter_info();
    eprintln!(
        "adapter: {} ({:?}, {})",
        info.name, info.backend, info.driver_info
    );

    let mut group = c.benchmark_group("attention");
    // On a CPU adapter such as lavapipe one iteration takes from tens of milliseconds to
    // seconds. Flat sampling runs the same iteration count in each of the 10 samples, which
    // keeps each benchmark to seconds, at the cost of criterion's slope estimate.
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));

    for (index, case) in cases().iter().enumerate() {
        let problem = &case.problem;
        let label = problem.label();
        let host = OwnedInputs::random(problem, SEED + index as u64);
        let buffers = DeviceTensors::upload(&context, &problem.shape, &host);
        group.throughput(Throughput::Elements(problem.flops() as u64));
        // The decoding and subgroup programs are timed where Kernel::Flash would pick them on
        // lavapipe: the first for few rows per key/value head, the second for more.
        let few_rows = problem.shape.group_size() * problem.shape.seq_q <= 4;
        let kernels = [
            ("gpu-three-stage", Kernel::ThreeStage, true),
            ("gpu-flash-tiled", Kernel::FlashTiled, true),
            ("gpu-flash-rows", Kernel::FlashRows, true),
            ("gpu-flash-decode", Kernel::FlashDecode, few_rows),
            ("gpu-flash-subgroup", Kernel::FlashSubgroup, !few_rows),
        ];
        for (name, kernel, _) in kernels.into_iter().filter(|&(_, _, timed)| timed) {
            // The upload and the first pipeline compilation finish here, outside any timing. A
            // kernel that rejects this shape on this adapter is reported and left out.
            if let Err(error) = context.attention_with(kernel, problem, &host.inputs()) {
                eprintln!("{name} on {label} left out: {error}");
                continue;
            }
            time_recorded(&context, kernel, problem, &buffers, 1);
            group.bench_function(BenchmarkId::new(name, &label), |b| {
                b.iter_custom(|iterations| {
                    time_recorded(&context, kernel, problem, &buffers, iterations)
                });
            });
        }

        if index == 0 {
            // The whole host-slice call: upload, kernels and read-back of `out` and `lse`.
            group.bench_function(
                BenchmarkId::new("gpu-three-stage-with-transfers", &label),
                |b| {
                    b.iter(|| {
                        context
                            .attention_with(Kernel::ThreeStage, problem, &host.inputs())
                            .unwrap_or_else(|error| panic!("attention on {label} failed: {error}"))
                    });
                },
            );
        }

        if case.with_reference {
            group.bench_function(BenchmarkId::new("cpu-reference", &label), |b| {
                b.iter(|| {
                    reference::attention(black_box(problem), &host.inputs())
                        .unwrap_or_else(|error| panic!("reference on {label} failed: {error}"))
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_attention, bench_host);
criterion_main!(benches);
