//! Attention on your own wgpu device: your buffers, your command encoder, your submission, and
//! your read-back, checked against the f64 reference.
//!
//! Run it with `cargo run --release --all-features --example own_device`. `tests/own_device.rs`
//! includes this file as a module and runs it.
//!
//! Outside this crate, add `bytemuck` and `pollster` to your dependencies, and use the `wgpu` that
//! `wgpu_attention` re-exports, so that the versions match.

// The test includes this file as a module and never calls `main`.
#![allow(dead_code)]

use wgpu_attention::validate::{ErrorStats, Tolerance};
use wgpu_attention::wgpu::{self, util::DeviceExt};
use wgpu_attention::{
    AttentionProblem, AttentionShape, Causal, Context, GpuTensors, Kernel, OwnedInputs, reference,
};

/// Creates a device as an application would, with the features the kernels use where the
/// adapter has them, and the adapter's limits. The fused kernels bind 8 storage buffers per
/// shader stage, as `wgpu::Limits::default()` allows; `Limits::downlevel_defaults()` allows 4,
/// too few for any kernel.
pub fn create_device() -> Result<(wgpu::Device, wgpu::Queue), Box<dyn std::error::Error>> {
    let instance = wgpu::Instance::default();
    let adapter = pollster::block_on(instance.request_adapter(&Default::default()))?;
    let kernel_features =
        wgpu::Features::SHADER_F16 | wgpu::Features::SHADER_INT64 | wgpu::Features::SUBGROUP;
    let descriptor = wgpu::DeviceDescriptor {
        required_features: adapter.features() & kernel_features,
        required_limits: adapter.limits(),
        ..Default::default()
    };
    Ok(pollster::block_on(adapter.request_device(&descriptor))?)
}

/// Records grouped-query attention with a causal mask into an encoder of `device`, runs it, reads
/// the output back and compares it with the reference.
pub fn attention_on(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
) -> Result<ErrorStats, Box<dyn std::error::Error>> {
    // The context keeps its own handles to the device and queue, and caches the pipelines it
    // compiles. Buffers passed to it must come from this device.
    let context = Context::from_device(device.clone(), queue.clone());

    // Batch 1, 8 query heads over 2 key/value heads, 16 queries, 64 keys, head dim 32.
    let shape = AttentionShape::new(1, 8, 16, 64, 32).with_kv_heads(2);
    let problem = AttentionProblem::new(shape).with_causal(Causal::BottomRight);
    let data = OwnedInputs::random(&problem, 1);

    // Inputs need STORAGE; the output also needs COPY_SRC to be read back. Sizes are in bytes:
    // 4 per f32 element (2 per f16 element with `Dtype::F16`).
    let input = |values: &[f32]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("attention input"),
            contents: bytemuck::cast_slice(values),
            usage: wgpu::BufferUsages::STORAGE,
        })
    };
    let (q, k, v) = (input(&data.q), input(&data.k), input(&data.v));
    let out_bytes = 4 * shape.out_len() as u64;
    let out = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("attention output"),
        size: out_bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("attention read-back"),
        size: out_bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });

    // Record the attention, then the copy, into one encoder, and submit it.
    let mut encoder = device.create_command_encoder(&Default::default());
    let tensors = GpuTensors::new(&q, &k, &v, &out);
    context.record(Kernel::Auto, &problem, &mut encoder, &tensors)?;
    encoder.copy_buffer_to_buffer(&out, 0, &readback, 0, out_bytes);
    queue.submit([encoder.finish()]);

    let slice = readback.slice(..);
    slice.map_async(wgpu::MapMode::Read, |result| {
        result.expect("the read-back buffer maps");
    });
    device.poll(wgpu::PollType::Wait {
        submission_index: None,
        timeout: None,
    })?;
    let gpu: Vec<f32> = bytemuck::cast_slice(&slice.get_mapped_range()?).to_vec();
    readback.unmap();

    let expected = reference::attention(&problem, &data.inputs())?;
    Ok(ErrorStats::compare(&gpu, &expected.out))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (device, queue) = create_device()?;
    let stats = attention_on(&device, &queue)?;
    println!("against the f64 reference: {stats}");
    if !stats.passes(&Tolerance::F32) {
        return Err(format!("the output fails the f32 tolerance {:?}", Tolerance::F32).into());
    }
    println!("within the f32 tolerance");
    Ok(())
}
