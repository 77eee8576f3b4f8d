//! The caller's own device: recording into the caller's encoder on the caller's buffers, and
//! devices whose limits force the kernels to split grids and chunk heads.

mod common;
#[path = "../examples/own_device.rs"]
mod example;

use common::{assert_matches_reference_on, device_with_limits};
use wgpu::util::DeviceExt;
use wgpu_attention::validate::{ErrorStats, Tolerance};
use wgpu_attention::{
    AttentionProblem, AttentionShape, Causal, Context, Error, GpuTensors, Kernel, KeyLengths,
    OwnedInputs, reference,
};

fn storage(device: &wgpu::Device, data: &[f32]) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(data),
        usage: wgpu::BufferUsages::STORAGE,
    })
}

/// Uploads the query, key and value tensors of `data` as storage buffers.
fn upload_qkv(
    device: &wgpu::Device,
    data: &OwnedInputs,
) -> (wgpu::Buffer, wgpu::Buffer, wgpu::Buffer) {
    (
        storage(device, &data.q),
        storage(device, &data.k),
        storage(device, &data.v),
    )
}

fn output(device: &wgpu::Device, elements: usize) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 4 * elements as u64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

fn read(device: &wgpu::Device, queue: &wgpu::Queue, buffer: &wgpu::Buffer) -> Vec<f32> {
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: buffer.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
    queue.submit([encoder.finish()]);
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, |result| result.unwrap());
    device
        .poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: None,
        })
        .unwrap();
    bytemuck::cast_slice(&staging.slice(..).get_mapped_range().unwrap()).to_vec()
}

#[test]
fn own_device_example_matches_reference() {
    let (device, queue) = example::create_device().unwrap();
    let stats = example::attention_on(&device, &queue).unwrap();
    assert!(stats.passes(&Tolerance::F32), "{stats}");
}

#[test]
fn context_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Context>();
}

#[test]
fn record_into_callers_encoder() {
    let (device, queue) = device_with_limits(|_| {});
    let context = Context::from_device(device.clone(), queue.clone());
    let shape = AttentionShape::new(2, 4, 33, 70, 24).with_kv_heads(2);
    let problem = AttentionProblem::new(shape)
        .with_causal(Causal::TopLeft)
        .with_mask(2, 1);
    let data = crate::common::random_inputs(&problem, 1, 0.1);
    let (q, k, v) = upload_qkv(&device, &data);
    let mask = storage(&device, data.mask.as_ref().unwrap());
    let out = output(&device, shape.q_len());
    let lse = output(&device, shape.lse_len());
    let tensors = GpuTensors {
        mask: Some(&mask),
        lse: Some(&lse),
        ..GpuTensors::new(&q, &k, &v, &out)
    };

    let mut encoder = device.create_command_encoder(&Default::default());
    context
        .record(Kernel::Auto, &problem, &mut encoder, &tensors)
        .unwrap();
    queue.submit([encoder.finish()]);

    let expected = reference::attention(&problem, &data.inputs()).unwrap();
    let out_stats = ErrorStats::compare(&read(&device, &queue, &out), &expected.out);
    assert!(out_stats.passes(&Tolerance::F32), "output: {out_stats}");
    let lse_stats = ErrorStats::compare(&read(&device, &queue, &lse), &expected.lse);
    assert!(lse_stats.passes(&Tolerance::F32), "lse: {lse_stats}");
}

#[test]
fn record_rejects_small_buffer() {
    let context = common::context();
    let device = context.device();
    let shape = AttentionShape::new(1, 2, 8, 8, 16);
    let problem = AttentionProblem::new(shape);
    let full = storage(device, &vec![0.0; shape.q_len()]);
    let short = output(device, shape.q_len() - 1);
    let tensors = GpuTensors::new(&full, &full, &full, &short);
    let error = common::record_error(context, &problem, &tensors);
    assert!(
        matches!(
            error,
            Error::BufferTooSmall {
                tensor: "out",
                size: 1020,
                needed: 1024,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("create it with at least 1024 bytes"),
        "{error}"
    );
}

#[test]
fn record_rejects_unaligned_f16_buffer() {
    let context = common::context();
    if !context.features().contains(wgpu::Features::SHADER_F16) {
        panic!("the test adapter lacks SHADER_F16, which lavapipe has; run it on lavapipe");
    }
    let device = context.device();

    // Three f16 values take 6 bytes, which no storage binding can hold exactly.
    let shape = AttentionShape::new(1, 1, 1, 3, 3);
    let problem = AttentionProblem::new(shape).with_dtype(wgpu_attention::Dtype::F16);
    let buffer = |size: u64| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    };
    let (q, kv, out) = (buffer(6), buffer(20), buffer(8));
    let tensors = GpuTensors::new(&q, &kv, &kv, &out);

    let error = common::record_error(context, &problem, &tensors);
    assert!(
        matches!(
            error,
            Error::UnalignedBuffer {
                tensor: "q",
                size: 6
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("create it with 8 bytes"),
        "{error}"
    );
}

#[test]
fn record_rejects_destroyed_and_foreign_buffers() {
    let context = common::context();
    let device = context.device();
    let shape = AttentionShape::new(1, 2, 4, 8, 16);
    let problem = AttentionProblem::new(shape);
    let data = common::random_inputs(&problem, 4, 0.0);
    let (q, k, v) = upload_qkv(device, &data);
    let out = output(device, shape.out_len());

    // Without the error scope in record, wgpu's default handler panics.
    q.destroy();
    let tensors = GpuTensors::new(&q, &k, &v, &out);
    let error = common::record_error(context, &problem, &tensors);
    assert!(matches!(error, Error::Device { .. }), "{error}");
    assert!(error.to_string().contains("destroyed"), "{error}");

    // A buffer of another device of the same instance.
    let instance = wgpu::Instance::default();
    let adapter = pollster::block_on(instance.request_adapter(&Default::default())).unwrap();
    let device_pair = || pollster::block_on(adapter.request_device(&Default::default())).unwrap();
    let ((first, first_queue), (second, _)) = (device_pair(), device_pair());
    let own = Context::from_device(first.clone(), first_queue);
    let (own_k, own_v) = (storage(&first, &data.k), storage(&first, &data.v));
    let own_out = output(&first, shape.out_len());
    let foreign = storage(&second, &data.q);
    let tensors = GpuTensors::new(&foreign, &own_k, &own_v, &own_out);
    let error = common::record_error(&own, &problem, &tensors);
    assert!(matches!(error, Error::Device { .. }), "{error}");

    // The context still works afterwards.
    let q = storage(device, &data.q);
    let tensors = GpuTensors::new(&q, &k, &v, &out);
    let mut encoder = device.create_command_encoder(&Default::default());
    context
        .record(Kernel::Auto, &problem, &mut encoder, &tensors)
        .unwrap();
}

#[test]
fn too_few_storage_buffers_per_stage() {
    // 5 storage buffers per stage fit the three-stage path but not the fused programs, which
    // Kernel::Auto then avoids; 4 fit neither.
    let (device, queue) =
        device_with_limits(|limits| limits.max_storage_buffers_per_shader_stage = 5);
    let context = Context::from_device(device, queue);
    let shape = AttentionShape::new(1, 2, 9, 9, 8);
    let problem = AttentionProblem::new(shape).with_causal(Causal::BottomRight);
    let data = crate::common::random_inputs(&problem, 5, 0.0);
    assert_eq!(Kernel::Auto.resolve(&problem, &context), Kernel::ThreeStage);
    assert_matches_reference_on(&context, Kernel::Auto, &problem, &data.inputs());
    let error = context
        .attention_with(Kernel::Flash, &problem, &data.inputs())
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::ExceedsLimit {
                limit_name: "max_storage_buffers_per_shader_stage",
                value: 8,
                limit: 5,
                ..
            }
        ),
        "{error}"
    );

    let (device, queue) =
        device_with_limits(|limits| limits.max_storage_buffers_per_shader_stage = 4);
    let context = Context::from_device(device, queue);
    let error = context
        .attention_with(Kernel::Auto, &problem, &data.inputs())
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::ExceedsLimit {
                value: 5,
                limit: 4,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("wgpu::Limits::default()"),
        "{error}"
    );
}

#[test]
fn record_rejects_buffer_without_storage_usage() {
    let context = common::context();
    let device = context.device();
    let shape = AttentionShape::new(1, 1, 4, 4, 4);
    let problem = AttentionProblem::new(shape);
    let full = storage(device, &vec![0.0; shape.q_len()]);
    let uniform = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 4 * shape.q_len() as u64,
        usage: wgpu::BufferUsages::UNIFORM,
        mapped_at_creation: false,
    });
    let out = output(device, shape.q_len());
    let tensors = GpuTensors::new(&uniform, &full, &full, &out);
    let error = common::record_error(context, &problem, &tensors);
    assert!(
        matches!(error, Error::BufferUsage { tensor: "q", .. }),
        "{error}"
    );
}

#[test]
fn small_dispatch_limit_splits_grids() {
    // Three workgroups per axis forces every stage's grid, including the per-row softmax grid
    // over 203 rows and the 6 heads, to be split into many dispatches.
    let (device, queue) =
        device_with_limits(|limits| limits.max_compute_workgroups_per_dimension = 3);
    let context = Context::from_device(device, queue);
    assert_eq!(context.limits().max_compute_workgroups_per_dimension, 3);
    let shape = AttentionShape::new(2, 3, 203, 300, 40);
    let problem = AttentionProblem::new(shape)
        .with_causal(Causal::BottomRight)
        .with_mask(1, 3);
    let data = crate::common::random_inputs(&problem, 2, 0.1);
    assert_matches_reference_on(&context, Kernel::ThreeStage, &problem, &data.inputs());
}

#[test]
fn small_binding_limit_chunks_heads() {
    // 64 KiB of storage per binding holds the score matrices of 2 heads of 90 × 90, so the 8
    // (batch, head) pairs run in 4 chunks.
    let (device, queue) =
        device_with_limits(|limits| limits.max_storage_buffer_binding_size = 64 << 10);
    let context = Context::from_device(device, queue);
    let shape = AttentionShape::new(2, 4, 90, 90, 16).with_kv_heads(2);
    let problem = AttentionProblem::new(shape).with_causal(Causal::TopLeft);
    let data = crate::common::random_inputs(&problem, 3, 0.0);
    assert_matches_reference_on(&context, Kernel::ThreeStage, &problem, &data.inputs());
}

#[test]
fn score_matrix_over_binding_limit_is_rejected() {
    let (device, queue) =
        device_with_limits(|limits| limits.max_storage_buffer_binding_size = 64 << 10);
    let context = Context::from_device(device, queue);
    let shape = AttentionShape::new(1, 1, 200, 200, 8);
    let problem = AttentionProblem::new(shape);
    let data = crate::common::random_inputs(&problem, 4, 0.0);
    let error = context
        .attention_with(Kernel::ThreeStage, &problem, &data.inputs())
        .unwrap_err();
    match &error {
        Error::ExceedsLimit {
            value,
            limit,
            limit_name,
            ..
        } => {
            assert_eq!(*value, 200 * 200 * 4);
            assert_eq!(*limit, 64 << 10);
            assert_eq!(*limit_name, "max_storage_buffer_binding_size");
        }
        other => panic!("expected ExceedsLimit, got {other}"),
    }
    assert!(
        error
            .to_string()
            .contains("max_storage_buffer_binding_size"),
        "{error}"
    );
}

#[test]
fn tensor_over_binding_limit_is_rejected() {
    let (device, queue) =
        device_with_limits(|limits| limits.max_storage_buffer_binding_size = 64 << 10);
    let context = Context::from_device(device, queue);
    let message = |kernel: Kernel, shape: AttentionShape| {
        let problem = AttentionProblem::new(shape);
        let data = crate::common::random_inputs(&problem, 5, 0.0);
        let error = context
            .attention_with(kernel, &problem, &data.inputs())
            .unwrap_err();
        assert!(matches!(error, Error::ExceedsLimit { .. }), "{error}");
        error.to_string()
    };

    // q holds 4 · 64 · 256 f32 values = 256 KiB, four times the limit.
    let q_error = message(Kernel::ThreeStage, AttentionShape::new(1, 4, 64, 8, 256));
    assert!(q_error.contains("tensor `q`"), "{q_error}");
    assert!(q_error.contains("query rows"), "{q_error}");

    // K of 1,024 keys at head dim 64 takes 256 KiB, and the fix names the key range.
    let k_error = message(Kernel::Flash, AttentionShape::new(1, 1, 1, 1024, 64));
    assert!(k_error.contains("tensor `k`"), "{k_error}");
    assert!(k_error.contains("merge_partials"), "{k_error}");
}

#[test]
fn row_programs_report_their_workgroup_memory() {
    // 4 KiB of workgroup memory fits no block of the row or decoding program at head dim 128.
    // Each must name its own need, which is over the limit, while the tiled program still runs.
    let (device, queue) =
        device_with_limits(|limits| limits.max_compute_workgroup_storage_size = 4096);
    let context = Context::from_device(device, queue);
    let shape = AttentionShape::new(2, 4, 100, 300, 128).with_kv_heads(2);
    let problem = AttentionProblem::new(shape);
    let data = crate::common::random_inputs(&problem, 7, 0.0);
    for kernel in [Kernel::FlashRows, Kernel::FlashDecode] {
        let error = context
            .attention_with(kernel, &problem, &data.inputs())
            .unwrap_err();
        match &error {
            Error::ExceedsLimit {
                value,
                limit,
                limit_name,
                ..
            } => {
                assert!(value > limit, "{kernel:?}: {error}");
                assert_eq!(*limit, 4096, "{kernel:?}");
                assert_eq!(*limit_name, "max_compute_workgroup_storage_size");
            }
            other => panic!("{kernel:?}: expected ExceedsLimit, got {other}"),
        }
        assert!(error.to_string().contains(kernel.name()), "{error}");
        assert!(error.to_string().contains("Kernel::Flash"), "{error}");
    }
    assert_matches_reference_on(&context, Kernel::FlashTiled, &problem, &data.inputs());
}

#[test]
fn flash_runs_where_three_stage_exceeds_binding() {
    // The fused kernel's memory grows with the inputs, not with seq_q × seq_kv: with 64 KiB
    // bindings one 200 × 200 score matrix does not fit, and the fused kernel still runs.
    let (device, queue) =
        device_with_limits(|limits| limits.max_storage_buffer_binding_size = 64 << 10);
    let context = Context::from_device(device, queue);
    let shape = AttentionShape::new(1, 2, 200, 200, 8);
    let problem = AttentionProblem::new(shape).with_causal(Causal::TopLeft);
    let data = crate::common::random_inputs(&problem, 6, 0.0);
    let error = context
        .attention_with(Kernel::ThreeStage, &problem, &data.inputs())
        .unwrap_err();
    assert!(matches!(error, Error::ExceedsLimit { .. }), "{error}");
    assert!(matches!(
        Kernel::Auto.resolve(&problem, &context),
        Kernel::FlashDecode | Kernel::FlashSubgroup | Kernel::FlashRows | Kernel::FlashTiled
    ));
    assert_matches_reference_on(&context, Kernel::Auto, &problem, &data.inputs());
}

#[test]
fn callers_device_keeps_adapter_guards() {
    // A context on the caller's device must know its adapter as Context::new does: on llvmpipe
    // the loop-cap guard must hold (a truncated sum would pass silently otherwise), and CPU
    // adapters must get the same fused program.
    let (device, queue) = device_with_limits(|_| {});
    let context = Context::from_device(device, queue);
    assert_eq!(
        context.adapter_info().name,
        common::context().adapter_info().name
    );

    let shape = AttentionShape::new(1, 1, 4, 65536, 8);
    let problem = AttentionProblem::new(shape);
    let data = crate::common::random_inputs(&problem, 65536, 0.0);
    assert_eq!(
        Kernel::Auto.resolve(&problem, &context),
        Kernel::Auto.resolve(&problem, common::context())
    );
    let three_stage = context.attention_with(Kernel::ThreeStage, &problem, &data.inputs());
    let row = reference::attention_row(&problem, &data.inputs(), 0, 0, 3).unwrap();
    if context.adapter_info().name.contains("llvmpipe") {
        let error = three_stage.unwrap_err();
        assert!(
            matches!(
                error,
                Error::Unsupported {
                    kernel: "three-stage",
                    ..
                }
            ),
            "{error}"
        );
    } else {
        let stats = ErrorStats::compare(&three_stage.unwrap().out[3 * 8..][..8], &row.out);
        assert!(stats.passes(&Tolerance::F32), "three-stage: {stats}");
    }
    for kernel in [Kernel::Auto, Kernel::FlashTiled, Kernel::FlashRows] {
        let gpu = context
            .attention_with(kernel, &problem, &data.inputs())
            .unwrap();
        let stats = ErrorStats::compare(&gpu.out[3 * 8..][..8], &row.out);
        assert!(stats.passes(&Tolerance::F32), "{kernel:?}: {stats}");
    }
}

#[test]
fn probabilities_across_head_chunks() {
    // 64 KiB bindings hold the scores of 2 heads of 90 × 90, so the 8 (batch, head) pairs run
    // in 4 chunks, each copied out after its softmax.
    let (device, queue) =
        device_with_limits(|limits| limits.max_storage_buffer_binding_size = 64 << 10);
    let context = Context::from_device(device, queue);
    let shape = AttentionShape::new(2, 4, 90, 90, 16).with_kv_heads(2);
    let problem = AttentionProblem::new(shape)
        .with_causal(Causal::BottomRight)
        .with_window(Some(30), None)
        .with_softcap(20.0)
        .with_mask(2, 1);
    let mut data = crate::common::random_inputs(&problem, 7, 0.1);
    // Row 5 of batch 1 sees no key.
    data.mask.as_mut().unwrap()[90 * 90 + 5 * 90..][..90].fill(f32::NEG_INFINITY);
    let (_, probs) = context.attention_probs(&problem, &data.inputs()).unwrap();
    assert_eq!(probs.len(), 2 * 4 * 90 * 90);
    for (b, h, i) in [(0, 0, 0), (0, 3, 89), (1, 1, 5), (1, 2, 45), (1, 3, 89)] {
        let row = reference::attention_row(&problem, &data.inputs(), b, h, i).unwrap();
        let start = ((b * 4 + h) * 90 + i) * 90;
        let stats = ErrorStats::compare(&probs[start..start + 90], &row.probs);
        assert!(stats.passes(&Tolerance::F32), "b{b} h{h} i{i}: {stats}");
    }
    let masked_row = &probs[((4 + 1) * 90 + 5) * 90..][..90];
    assert!(
        masked_row.iter().all(|&p| p == 0.0),
        "fully masked row: {masked_row:?}"
    );
}

#[test]
fn probabilities_over_buffer_limit_are_rejected() {
    let (device, queue) = device_with_limits(|limits| limits.max_buffer_size = 64 << 10);
    let context = Context::from_device(device, queue);
    let shape = AttentionShape::new(1, 2, 100, 100, 4);
    let problem = AttentionProblem::new(shape);
    let data = crate::common::random_inputs(&problem, 8, 0.0);
    let error = context
        .attention_probs(&problem, &data.inputs())
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::ExceedsLimit {
                limit_name: "max_buffer_size",
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("attention probabilities"),
        "{error}"
    );
}

#[test]
fn record_with_variant_buffers() {
    use wgpu_attention::Layout;
    let context = common::context();
    let device = context.device();
    let small = |data: &[u8]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: data,
            usage: wgpu::BufferUsages::COPY_SRC,
        })
    };
    let shape = AttentionShape::new(2, 4, 20, 50, 32)
        .with_kv_heads(2)
        .with_head_dim_v(24);
    let (cu_q, cu_kv) = (vec![0u32, 20, 31], vec![0u32, 50, 90]);
    let problem = AttentionProblem::new(shape)
        .with_causal(Causal::BottomRight)
        .with_layout(Layout::Bshd)
        .with_packed(31, 90);
    let mut data = crate::common::random_inputs(&problem, 8, 0.0);
    data.alibi_slopes = Some(vec![0.5, 0.25, 0.125, 0.0625]);
    data.sinks = Some(vec![0.0, 1.0, -1.0, 2.0]);
    data.kv_seq_lens = Some(vec![45, 30]);
    data.cu_seqlens = Some((cu_q.clone(), cu_kv.clone()));
    let expected = reference::attention(&problem, &data.inputs()).unwrap();

    let (q, k, v) = upload_qkv(device, &data);
    let alibi = small(bytemuck::cast_slice(data.alibi_slopes.as_ref().unwrap()));
    let sinks = small(bytemuck::cast_slice(data.sinks.as_ref().unwrap()));
    let lens = small(bytemuck::cast_slice(data.kv_seq_lens.as_ref().unwrap()));
    let (cu_q, cu_kv) = (
        small(bytemuck::cast_slice(&cu_q)),
        small(bytemuck::cast_slice(&cu_kv)),
    );
    for kernel in common::kernels() {
        let out = output(device, problem.spans()[3]);
        let lse = output(device, problem.lse_len());
        let tensors = GpuTensors::new(&q, &k, &v, &out)
            .with_lse(&lse)
            .with_alibi_slopes(&alibi)
            .with_sinks(&sinks)
            .with_kv_seq_lens(&lens)
            .with_cu_seqlens(&cu_q, &cu_kv);
        let mut encoder = device.create_command_encoder(&Default::default());
        context
            .record(kernel, &problem, &mut encoder, &tensors)
            .unwrap();
        context.queue().submit([encoder.finish()]);
        let out_stats = ErrorStats::compare(&read(device, context.queue(), &out), &expected.out);
        assert!(
            out_stats.passes(&Tolerance::F32),
            "{kernel:?} output: {out_stats}"
        );
        let lse_stats = ErrorStats::compare(&read(device, context.queue(), &lse), &expected.lse);
        assert!(
            lse_stats.passes(&Tolerance::F32),
            "{kernel:?} lse: {lse_stats}"
        );
    }

    // The small tensors are copied, so they need COPY_SRC; packed offsets need the problem.
    let out = output(device, problem.spans()[3]);
    let storage_only = storage(device, &[0.5; 4]);
    let mut encoder = device.create_command_encoder(&Default::default());
    let error = context
        .record(
            Kernel::Auto,
            &problem,
            &mut encoder,
            &GpuTensors::new(&q, &k, &v, &out)
                .with_sinks(&storage_only)
                .with_cu_seqlens(&cu_q, &cu_kv),
        )
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::BufferUsage {
                tensor: "sinks",
                ..
            }
        ),
        "{error}"
    );
    let error = context
        .record(
            Kernel::Auto,
            &problem,
            &mut encoder,
            &GpuTensors::new(&q, &k, &v, &out),
        )
        .unwrap_err();
    assert!(matches!(error, Error::PackedMismatch(_)), "{error}");
}

#[test]
fn record_rejects_aliased_output() {
    let context = common::context();
    let device = context.device();
    let shape = AttentionShape::new(1, 2, 8, 8, 16);
    let problem = AttentionProblem::new(shape);
    let q = output(device, shape.q_len());
    let kv = output(device, shape.k_len());
    let lse = output(device, problem.lse_len());
    let mut encoder = device.create_command_encoder(&Default::default());
    let cases = [
        (GpuTensors::new(&q, &kv, &kv, &q), "out", "q"),
        (GpuTensors::new(&q, &kv, &kv, &kv), "out", "k"),
        (
            GpuTensors::new(&q, &kv, &lse, &lse).with_lse(&lse),
            "out",
            "v",
        ),
    ];
    for (tensors, written, other) in cases {
        let error = context
            .record(Kernel::Auto, &problem, &mut encoder, &tensors)
            .unwrap_err();
        assert!(
            matches!(error, Error::BufferAlias { written: w, other: o } if w == written && o == other),
            "{error}"
        );
    }
}

/// Creates a buffer of key lengths that the queue can rewrite between steps.
fn lengths(device: &wgpu::Device, lens: &[u32]) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(lens),
        usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
    })
}

#[test]
fn prepared_decoding_follows_key_lengths() {
    // A cache of 2,048 keys, read at three lengths per batch element, each written by the queue
    // before the prepared call runs again. One key/value head per batch element leaves few
    // enough workgroups for the fused kernel to split the keys. Two query rows per step, with the
    // causal mask and a window placed by each length.
    let (device, queue) = device_with_limits(|_| {});
    let context = Context::from_device(device.clone(), queue.clone());
    let shape = AttentionShape::new(2, 8, 2, 2048, 64).with_kv_heads(1);
    let problem = AttentionProblem::new(shape)
        .with_causal(Causal::BottomRight)
        .with_window(Some(300), None)
        .with_key_lengths(KeyLengths::Cache);
    let data = crate::common::random_inputs(&problem, 7, 0.0);
    let (q, k, v) = upload_qkv(&device, &data);
    let out = output(&device, shape.q_len());
    let lse = output(&device, shape.lse_len());
    let lens = lengths(&device, &[2048, 2048]);
    let tensors = GpuTensors::new(&q, &k, &v, &out)
        .with_lse(&lse)
        .with_kv_seq_lens(&lens);
    let prepared = context.prepare(Kernel::Flash, &problem, &tensors).unwrap();
    assert_eq!(prepared.kernel(), Kernel::Flash.resolve(&problem, &context));

    for step in [[1, 2048], [700, 33], [2047, 2]] {
        queue.write_buffer(&lens, 0, bytemuck::cast_slice(&step));
        let mut encoder = device.create_command_encoder(&Default::default());
        prepared.record(&mut encoder);
        queue.submit([encoder.finish()]);

        let expected =
            reference::attention(&problem, &data.inputs().with_kv_seq_lens(&step)).unwrap();
        let out_stats = ErrorStats::compare(&read(&device, &queue, &out), &expected.out);
        assert!(
            out_stats.passes(&Tolerance::F32),
            "{step:?}: output: {out_stats}"
        );
        let lse_stats = ErrorStats::compare(&read(&device, &queue, &lse), &expected.lse);
        assert!(
            lse_stats.passes(&Tolerance::F32),
            "{step:?}: lse: {lse_stats}"
        );
    }
}

#[test]
fn short_lengths_use_fewer_splits() {
    // A cache of 8,192 keys, read first in full and then at lengths that leave some or most
    // splits empty. Empty splits' workgroups return at once and the merge skips them, so their
    // partial results from an earlier call, still in the scratch buffer, must not reach the
    // output. One key/value head keeps the workgroups per split below the number under which
    // every fused program splits the keys, on GPUs and CPUs alike. A batch of one gives at least
    // 4 splits, of which 1,500 and 600 keys fill 3 and 2. A batch of two gives at least 2, with
    // one sequence merged and the other written directly in the same call. The shared context's
    // device has the optional features that the subgroup program needs.
    let single_steps: &[&[u32]] = &[&[8192], &[1500], &[600], &[100], &[0], &[8191]];
    let batch_steps: &[&[u32]] = &[
        &[8192, 8192],
        &[100, 5000],
        &[0, 1],
        &[513, 8191],
        &[8192, 600],
    ];
    for (batch, steps) in [(1, single_steps), (2, batch_steps)] {
        decode_at_lengths(batch, steps);
    }
}

/// Runs every fused program, prepared once, on a cache of 8,192 keys of `batch` sequences at
/// each step's key lengths, and checks each step against the reference.
fn decode_at_lengths(batch: usize, steps: &[&[u32]]) {
    let context = crate::common::context();
    let (device, queue) = (context.device(), context.queue());
    let shape = AttentionShape::new(batch, 4, 1, 8192, 64).with_kv_heads(1);
    let problem = AttentionProblem::new(shape)
        .with_causal(Causal::BottomRight)
        .with_key_lengths(KeyLengths::Cache);
    let data = crate::common::random_inputs(&problem, 8, 0.0);
    let (q, k, v) = upload_qkv(device, &data);
    let out = output(device, shape.q_len());
    let lse = output(device, shape.lse_len());
    let lens = lengths(device, steps[0]);
    let tensors = GpuTensors::new(&q, &k, &v, &out)
        .with_lse(&lse)
        .with_kv_seq_lens(&lens);
    let fused = crate::common::kernels()
        .into_iter()
        .filter(|&kernel| kernel != Kernel::ThreeStage);
    for kernel in fused {
        let prepared = context.prepare(kernel, &problem, &tensors).unwrap();
        for &step in steps {
            queue.write_buffer(&lens, 0, bytemuck::cast_slice(step));
            let mut encoder = device.create_command_encoder(&Default::default());
            prepared.record(&mut encoder);
            queue.submit([encoder.finish()]);

            let expected =
                reference::attention(&problem, &data.inputs().with_kv_seq_lens(step)).unwrap();
            let label = format!("{} {step:?}", kernel.name());
            let out_stats = ErrorStats::compare(&read(device, queue, &out), &expected.out);
            assert!(
                out_stats.passes(&Tolerance::F32),
                "{label}: output: {out_stats}"
            );
            let lse_stats = ErrorStats::compare(&read(device, queue, &lse), &expected.lse);
            assert!(
                lse_stats.passes(&Tolerance::F32),
                "{label}: lse: {lse_stats}"
            );
        }
    }
}

#[test]
fn calls_in_one_encoder_share_scratch_buffers() {
    // Both problems split their keys, so both bind the context's partial-results buffer, which
    // the first one sized. The encoder records a prepared call, then a plain one.
    let (device, queue) = device_with_limits(|_| {});
    let context = Context::from_device(device.clone(), queue.clone());
    let large = AttentionProblem::new(AttentionShape::new(1, 8, 2, 3000, 32).with_kv_heads(8));
    let small = AttentionProblem::new(AttentionShape::new(1, 4, 1, 1500, 48).with_kv_heads(1));
    let mut calls = Vec::new();
    for (index, problem) in [large, small].into_iter().enumerate() {
        let data = crate::common::random_inputs(&problem, 20 + index as u64, 0.0);
        let (q, k, v) = upload_qkv(&device, &data);
        let buffers = [q, k, v, output(&device, problem.shape.q_len())];
        calls.push((problem, data, buffers));
    }
    fn tensors(buffers: &[wgpu::Buffer; 4]) -> GpuTensors<'_> {
        GpuTensors::new(&buffers[0], &buffers[1], &buffers[2], &buffers[3])
    }
    let prepared = context
        .prepare(Kernel::Flash, &calls[0].0, &tensors(&calls[0].2))
        .unwrap();

    let mut encoder = device.create_command_encoder(&Default::default());
    prepared.record(&mut encoder);
    context
        .record(
            Kernel::Flash,
            &calls[1].0,
            &mut encoder,
            &tensors(&calls[1].2),
        )
        .unwrap();
    queue.submit([encoder.finish()]);
    let check = |when: &str| {
        for (problem, data, buffers) in &calls {
            let expected = reference::attention(problem, &data.inputs()).unwrap();
            let stats = ErrorStats::compare(&read(&device, &queue, &buffers[3]), &expected.out);
            let label = problem.label();
            assert!(stats.passes(&Tolerance::F32), "{when}, {label}: {stats}");
        }
    };
    check("shared");

    // Released scratch buffers leave the prepared call with its own, and the next plain call
    // makes them again.
    assert!(context.release_scratch() > 0);
    assert_eq!(context.release_scratch(), 0);
    let mut encoder = device.create_command_encoder(&Default::default());
    for (_, _, buffers) in &calls {
        encoder.clear_buffer(&buffers[3], 0, None);
    }
    context
        .record(
            Kernel::Flash,
            &calls[1].0,
            &mut encoder,
            &tensors(&calls[1].2),
        )
        .unwrap();
    prepared.record(&mut encoder);
    queue.submit([encoder.finish()]);
    check("after release_scratch");
}

#[test]
fn packed_offsets_past_the_tensors_are_cut() {
    // Offsets in GPU buffers reach the programs unchecked. The second sequence's offsets reach
    // past the 5 query rows and 6 keys of the packed tensors, so every program must cut it to
    // rows 3..5 and keys 4..6. No program may read the NaN keys past the tensors or write the
    // output past its rows. With 2 heads in BHSD, the rows past head 0 are head 1's.
    let context = common::context();
    let device = context.device();
    let (heads, head_dim, total_q, total_kv) = (2, 8, 5, 6);
    let shape = AttentionShape::new(2, heads, 3, 4, head_dim);
    let problem = AttentionProblem::new(shape)
        .with_causal(Causal::BottomRight)
        .with_packed(total_q, total_kv);
    let data = OwnedInputs::random(&problem, 11);
    let cut = data.inputs().with_cu_seqlens(&[0, 3, 5], &[0, 4, 6]);
    let expected = reference::attention(&problem, &cut).unwrap().out;

    let nan_tail = |tensor: &[f32]| {
        let mut padded = tensor.to_vec();
        padded.resize(tensor.len() + 4 * head_dim, f32::NAN);
        storage(device, &padded)
    };
    let (q, k, v) = (
        storage(device, &data.q),
        nan_tail(&data.k),
        nan_tail(&data.v),
    );
    let offsets = |values: &[u32]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(values),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        })
    };
    let (cu_q, cu_kv) = (offsets(&[0, 3, 100]), offsets(&[0, 4, 50]));
    let tail = 4 * head_dim;
    for kernel in common::kernels() {
        let out = output(device, expected.len() + tail);
        context.queue().write_buffer(
            &out,
            0,
            bytemuck::cast_slice(&vec![7.0f32; expected.len() + tail]),
        );
        let tensors = GpuTensors::new(&q, &k, &v, &out).with_cu_seqlens(&cu_q, &cu_kv);
        let mut encoder = device.create_command_encoder(&Default::default());
        context
            .record(kernel, &problem, &mut encoder, &tensors)
            .unwrap();
        context.queue().submit([encoder.finish()]);
        let written = read(device, context.queue(), &out);
        let stats = ErrorStats::compare(&written[..expected.len()], &expected);
        assert!(stats.passes(&Tolerance::F32), "{kernel:?}: {stats}");
        assert!(
            written[expected.len()..].iter().all(|&x| x == 7.0),
            "{kernel:?} wrote past the output rows"
        );
    }
}
