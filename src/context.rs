//! Adapter selection, the device and queue, the compiled-pipeline cache and the scratch
//! buffers that calls reuse.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// Loop iterations after which llvmpipe stops executing the loops of a shader invocation.
///
/// Mesa's gallivm (Mesa 22.3, `LP_MAX_TGSI_LOOP_ITERATIONS`) guards against endless loops with
/// one counter per invocation shared by every loop in the shader, so a kernel whose loops run
/// longer in total ends them early and silently returns a wrong result. The kernels estimate
/// their loop count and reject problems over this cap on llvmpipe.
// NOTE: the cap was inferred from outputs that stopped after a fixed number of key tiles; newer
// Mesa versions may differ.
pub const LLVMPIPE_MAX_LOOP_ITERATIONS: u64 = 65_535;

/// Environment variable that picks an adapter by a part of its name or by backend.
pub const ADAPTER_ENV: &str = "WGPU_ATTENTION_ADAPTER";

/// Returns the adapter request in [`ADAPTER_ENV`], which [`Context::new`] follows, or `None`
/// when the variable is unset or blank.
pub fn adapter_request_from_env() -> Option<String> {
    std::env::var(ADAPTER_ENV)
        .ok()
        .filter(|request| !request.trim().is_empty())
}

/// A wgpu device and queue with the attention pipelines compiled for them.
///
/// Pipelines are compiled on first use and cached, so later calls with the same kernel and tile
/// sizes reuse them. The small scratch buffers that every call binds are kept too, until
/// [`Context::release_scratch`]: the fused kernels' partial results, a log-sum-exp output where
/// the caller passes none, and the per-head and per-sequence values. Each grows to the largest
/// size a call has needed. The three-stage kernel's score buffer is not kept. The context
/// is `Send + Sync`: share it across threads behind an `Arc`.
pub struct Context {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: wgpu::Features,
    /// The adapter's features, known when the context requested the device itself. Errors use
    /// them to tell a feature the device lacks from one the adapter cannot give.
    adapter_features: Option<wgpu::Features>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<Pipeline>>>,
    scratch: Mutex<[Option<wgpu::Buffer>; Scratch::COUNT]>,
    /// Set once the warning that f16 inputs are converted on the host has been logged, so that
    /// a loop of f16 calls on a device without SHADER_F16 logs it once.
    pub(crate) warned_f16_conversion: AtomicBool,
}

/// The scratch buffers a context keeps between calls, one of each.
///
/// Reusing them is sound because every call writes each one before it reads it, within the
/// commands it records. wgpu orders the uses of one buffer across passes and command buffers,
/// as it does for the caller's own `out` buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Scratch {
    /// Bound in place of a mask when the problem has none, and never read.
    NoMask,
    /// The log-sum-exp output when the caller passes no buffer for it. Nothing reads it.
    Lse,
    /// The per-head and per-sequence values that `gather_aux` copies from the caller's buffers.
    Aux,
    /// The fused kernels' partial results of the key splits, which the merge pass reads.
    Partial,
}

impl Scratch {
    const COUNT: usize = 4;

    fn label(self) -> &'static str {
        match self {
            Scratch::NoMask => "wgpu-attention no mask",
            Scratch::Lse => "wgpu-attention lse",
            Scratch::Aux => "wgpu-attention per-head and per-sequence values",
            Scratch::Partial => "wgpu-attention partial results",
        }
    }
}

/// Identifies one compiled pipeline: a shader and its override constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PipelineKey {
    pub shader: &'static str,
    /// Element type of the tensors in memory, which selects the storage prelude.
    pub dtype: crate::problem::Dtype,
    /// Override constants, as (name, value) pairs in a fixed order.
    pub constants: Vec<(&'static str, u32)>,
    /// Whether wgpu adds its bounds checks to the program's array accesses. Only the decoding
    /// program goes without, on CPU adapters, for the reason given in
    /// [`compile`](crate::kernels::compile).
    pub bounds_checks: bool,
}

/// A compiled compute pipeline with the bind group layout its dispatches use.
pub(crate) struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

impl Context {
    /// Creates a context on the adapter named by `WGPU_ATTENTION_ADAPTER`, or on the best adapter
    /// found when it is unset.
    ///
    /// # Errors
    ///
    /// [`Error::NoAdapter`] (with instructions to install a Vulkan driver) when wgpu finds no
    /// adapter, [`Error::AdapterNotFound`] when none matches the variable, and
    /// [`Error::RequestDevice`] when the device cannot be created.
    pub fn new() -> Result<Self> {
        Self::with_adapter(adapter_request_from_env().as_deref())
    }

    /// Creates a context on the first adapter matching `request`, or on the best adapter found
    /// when `request` is `None`.
    ///
    /// `request` is either a backend (`vulkan`, `metal`, `dx12`, `gl`) or a case-insensitive part
    /// of the adapter's name (`llvmpipe`, `nvidia`). The best adapter is a discrete GPU before an
    /// integrated one, a GPU before a CPU, and Vulkan, Metal or DX12 before GL.
    ///
    /// # Errors
    ///
    /// As [`Context::new`].
    pub fn with_adapter(request: Option<&str>) -> Result<Self> {
        let adapter = select_adapter(request)?;
        pollster::block_on(Self::from_adapter(&adapter))
    }

    /// Creates a context with a new device from `adapter`, requesting every limit it offers and
    /// the optional features the kernels and benchmarks use (`SHADER_F16`, `SHADER_INT64`,
    /// `SUBGROUP`, `TIMESTAMP_QUERY`, `TIMESTAMP_QUERY_INSIDE_ENCODERS`) where it has them.
    ///
    /// # Errors
    ///
    /// [`Error::RequestDevice`] when the device cannot be created.
    pub async fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        let info = adapter.get_info();
        let wanted = wgpu::Features::SHADER_F16
            | wgpu::Features::SHADER_INT64
            | wgpu::Features::SUBGROUP
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        let descriptor = wgpu::DeviceDescriptor {
            label: Some("wgpu-attention"),
            required_features: adapter.features() & wanted,
            required_limits: adapter.limits(),
            ..Default::default()
        };
        let (device, queue) = adapter
            .request_device(&descriptor)
            .await
            .map_err(|source| Error::RequestDevice {
                adapter: info.name.clone(),
                source,
            })?;
        log::info!(
            "using adapter {} ({:?}, {})",
            info.name,
            info.backend,
            info.driver_info
        );
        let mut context = Self::from_device(device, queue);
        context.adapter_features = Some(adapter.features());
        Ok(context)
    }

    /// Creates a context on the caller's own device and queue.
    ///
    /// The kernels respect the device's limits and use only the features it was created with.
    /// The fused kernels bind 8 storage buffers per shader stage and the three-stage path 5, so
    /// create the device with at least `wgpu::Limits::default()`, which allows 8. With fewer,
    /// calls return [`Error::ExceedsLimit`] naming `max_storage_buffers_per_shader_stage`.
    /// `examples/own_device.rs` creates a device, records into its own encoder and reads the
    /// output back.
    ///
    /// Buffers passed to [`Context::record`] and [`Context::prepare`] must come from this
    /// device. wgpu reports a buffer of another device of the same `wgpu::Instance`, which
    /// `record` returns as [`Error::Device`].
    // NOTE: wgpu 30 reports nothing for a buffer of another instance, and such a call wrote
    // wrong outputs on lavapipe.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let limits = device.limits();
        let features = device.features();
        let info = device.adapter_info();
        Self {
            device,
            queue,
            info,
            limits,
            features,
            adapter_features: None,
            pipelines: Mutex::new(HashMap::new()),
            scratch: Mutex::new(Default::default()),
            warned_f16_conversion: AtomicBool::new(false),
        }
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Returns the description of the adapter the device was created from; the kernels use it
    /// to pick programs for CPU adapters and to guard against llvmpipe's loop cap.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device's limits.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Returns whether the adapter runs on the CPU, like llvmpipe. There the fused kernel takes its
    /// decoding or subgroup program.
    pub(crate) fn on_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Returns the subgroup size when the device has the `SUBGROUP` feature and its adapter
    /// runs every subgroup at one size, as llvmpipe does (8 lanes on 256-bit vectors).
    pub(crate) fn fixed_subgroup_size(&self) -> Option<u32> {
        let fixed = self.info.subgroup_min_size == self.info.subgroup_max_size;
        (self.features.contains(wgpu::Features::SUBGROUP) && fixed)
            .then_some(self.info.subgroup_min_size)
    }

    /// Whether the device is Mesa's llvmpipe (lavapipe on Vulkan), which ends every loop of a
    /// shader invocation once the invocation has run [`LLVMPIPE_MAX_LOOP_ITERATIONS`] loop
    /// iterations in all.
    pub(crate) fn loop_iterations_capped(&self) -> bool {
        self.info.driver == "llvmpipe" || self.info.name.contains("llvmpipe")
    }

    /// The device's features.
    pub fn features(&self) -> wgpu::Features {
        self.features
    }

    /// Returns whether the adapter cannot give `feature` to any device: known only for contexts
    /// that created their own device, and false for one built on the caller's device.
    pub(crate) fn adapter_lacks(&self, feature: wgpu::Features) -> bool {
        self.adapter_features
            .is_some_and(|offered| !offered.contains(feature))
    }

    /// Returns the cached pipeline for `key`, compiling it with `build` on first use.
    pub(crate) fn pipeline(
        &self,
        key: PipelineKey,
        build: impl FnOnce(&wgpu::Device, &PipelineKey) -> Result<Pipeline>,
    ) -> Result<Arc<Pipeline>> {
        // A poisoned lock only means another thread panicked while compiling; the map is still
        // consistent because entries are inserted whole.
        let mut cache = self
            .pipelines
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(pipeline) = cache.get(&key) {
            return Ok(pipeline.clone());
        }
        let pipeline = Arc::new(build(&self.device, &key)?);
        log::debug!(
            "compiled pipeline {} with constants {:?}",
            key.shader,
            key.constants
        );
        cache.insert(key, pipeline.clone());
        Ok(pipeline)
    }
}

impl Context {
    /// Drops the scratch buffers that the context keeps between calls, such as the partial
    /// results of a long call whose keys were split, and returns how many bytes they took. The
    /// next call creates the ones it needs again. Prepared calls and work already submitted keep
    /// the buffers they use until they are done with them.
    pub fn release_scratch(&self) -> u64 {
        let mut slots = self
            .scratch
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        slots
            .iter_mut()
            .filter_map(Option::take)
            .map(|buffer| buffer.size())
            .sum()
    }

    /// Returns the context's `role` scratch buffer, replacing it with a larger one when it has
    /// fewer than `bytes` bytes (at least 4).
    ///
    /// A replacement is rounded up to a power of two, within the storage binding limit, so that
    /// a decoding loop whose key count grows by one per token replaces it seldom. The buffer
    /// replaced stays alive until the work recorded with it is done, as wgpu keeps it.
    pub(crate) fn scratch(&self, role: Scratch, bytes: u64) -> wgpu::Buffer {
        let bytes = bytes.max(4);
        let mut slots = self
            .scratch
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let slot = &mut slots[role as usize];
        if let Some(buffer) = slot.as_ref().filter(|buffer| buffer.size() >= bytes) {
            return buffer.clone();
        }
        let rounded = bytes
            .next_power_of_two()
            .min(self.limits.max_storage_buffer_binding_size)
            .max(bytes)
            .next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(role.label()),
            size: rounded,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        *slot = Some(buffer.clone());
        buffer
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("adapter", &self.info.name)
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

/// Lists every adapter wgpu finds on every backend.
pub fn enumerate_adapters() -> Vec<wgpu::Adapter> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

/// Picks the adapter matching `request`, or the best one when `request` is `None`.
///
/// # Errors
///
/// [`Error::NoAdapter`] when there is none at all, [`Error::AdapterNotFound`] when none matches.
pub fn select_adapter(request: Option<&str>) -> Result<wgpu::Adapter> {
    let mut adapters = enumerate_adapters();
    if adapters.is_empty() {
        return Err(Error::NoAdapter);
    }
    adapters.sort_by_key(|adapter| adapter_rank(&adapter.get_info()));
    let Some(request) = request else {
        return Ok(adapters.swap_remove(0));
    };
    let wanted = request.trim().to_lowercase();
    let position = adapters.iter().position(|adapter| {
        let info = adapter.get_info();
        backend_name(info.backend) == wanted || info.name.to_lowercase().contains(&wanted)
    });
    match position {
        Some(index) => Ok(adapters.swap_remove(index)),
        None => Err(Error::AdapterNotFound {
            request: request.to_string(),
            available: adapters
                .iter()
                .map(|adapter| {
                    let info = adapter.get_info();
                    format!("{} ({})", info.name, backend_name(info.backend))
                })
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Lower ranks are preferred: GPUs before CPUs, native APIs before GL.
fn adapter_rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let device = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (device, backend)
}

/// The lowercase backend name used for adapter selection.
pub fn backend_name(backend: wgpu::Backend) -> &'static str {
    match backend {
        wgpu::Backend::Vulkan => "vulkan",
        wgpu::Backend::Metal => "metal",
        wgpu::Backend::Dx12 => "dx12",
        wgpu::Backend::Gl => "gl",
        wgpu::Backend::BrowserWebGpu => "webgpu",
        _ => "other",
    }
}
