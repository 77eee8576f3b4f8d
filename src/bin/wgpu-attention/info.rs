//! `info`: every adapter with the features and limits the kernels depend on.

use std::process::ExitCode;

use serde_json::json;

#[derive(clap::Args)]
pub(crate) struct InfoArgs {
    /// Print one JSON object per adapter instead of text. Its fields are index, default
    /// (whether check, bench and validate open it without --adapter), name, backend,
    /// device_type, driver, driver_info, vendor_id, device_id, shader_f16, shader_int64,
    /// subgroups, subgroup_min_size and subgroup_max_size (null without subgroups),
    /// timestamp_query, timestamp_query_inside_encoders (what bench needs to time on the GPU)
    /// and limits.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &InfoArgs) -> Result<ExitCode, wgpu_attention::Error> {
    let adapters = wgpu_attention::enumerate_adapters();
    if adapters.is_empty() {
        return Err(wgpu_attention::Error::NoAdapter);
    }
    // The adapter that check, bench and validate open without --adapter.
    let request = wgpu_attention::adapter_request_from_env();
    let default = match wgpu_attention::select_adapter(request.as_deref()) {
        Ok(adapter) => Some(adapter.get_info()),
        // Only a request from the environment can match nothing here.
        Err(wgpu_attention::Error::AdapterNotFound { request, .. }) => {
            eprintln!(
                "note: {}=`{request}` matches no adapter below, so none is the default; set it \
                 to a part of an adapter's name or to its backend, or unset it",
                wgpu_attention::ADAPTER_ENV
            );
            None
        }
        Err(error) => {
            eprintln!("note: no adapter is the default: {error}");
            None
        }
    };
    for (index, adapter) in adapters.iter().enumerate() {
        let info = adapter.get_info();
        let is_default = default.as_ref() == Some(&info);
        let features = adapter.features();
        let limits = adapter.limits();
        let f16 = features.contains(wgpu::Features::SHADER_F16);
        let int64 = features.contains(wgpu::Features::SHADER_INT64);
        let subgroups = features.contains(wgpu::Features::SUBGROUP);
        let timestamps = features.contains(wgpu::Features::TIMESTAMP_QUERY);
        // bench times on the GPU only with timestamps written inside its command encoders.
        let encoder_timestamps = features.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);
        // Drivers without subgroups may still report sizes, which mean nothing then.
        let subgroup_sizes = subgroups.then_some((info.subgroup_min_size, info.subgroup_max_size));
        let limit_rows = [
            (
                "max_storage_buffer_binding_size",
                limits.max_storage_buffer_binding_size,
            ),
            ("max_buffer_size", limits.max_buffer_size),
            (
                "max_compute_workgroup_storage_size",
                u64::from(limits.max_compute_workgroup_storage_size),
            ),
            (
                "max_compute_invocations_per_workgroup",
                u64::from(limits.max_compute_invocations_per_workgroup),
            ),
            (
                "max_compute_workgroup_size_x",
                u64::from(limits.max_compute_workgroup_size_x),
            ),
            (
                "max_compute_workgroup_size_y",
                u64::from(limits.max_compute_workgroup_size_y),
            ),
            (
                "max_compute_workgroups_per_dimension",
                u64::from(limits.max_compute_workgroups_per_dimension),
            ),
        ];
        if args.json {
            let limits_json: serde_json::Map<String, serde_json::Value> = limit_rows
                .iter()
                .map(|(name, value)| (name.to_string(), json!(value)))
                .collect();
            let object = json!({
                "index": index,
                "default": is_default,
                "name": info.name,
                "backend": wgpu_attention::backend_name(info.backend),
                "device_type": format!("{:?}", info.device_type),
                "driver": crate::driver_name(&info),
                "driver_info": info.driver_info,
                "vendor_id": info.vendor,
                "device_id": info.device,
                "shader_f16": f16,
                "shader_int64": int64,
                "subgroups": subgroups,
                "subgroup_min_size": subgroup_sizes.map(|(min, _)| min),
                "subgroup_max_size": subgroup_sizes.map(|(_, max)| max),
                "timestamp_query": timestamps,
                "timestamp_query_inside_encoders": encoder_timestamps,
                "limits": limits_json,
            });
            println!("{object}");
            continue;
        }
        let marker = if is_default {
            "  (default: check, bench and validate open it without --adapter)"
        } else {
            ""
        };
        println!("[{index}] {}{marker}", info.name);
        println!(
            "    backend       {}",
            wgpu_attention::backend_name(info.backend)
        );
        println!("    device type   {:?}", info.device_type);
        println!("    driver        {}", crate::driver_label(&info));
        println!("    SHADER_F16    {}", yes_no(f16));
        println!("    SHADER_INT64  {}", yes_no(int64));
        match subgroup_sizes {
            Some((min, max)) => println!("    subgroups     yes, size {min} to {max}"),
            None => println!("    subgroups     no"),
        }
        let timestamp_use = if encoder_timestamps {
            "yes, inside encoders (bench times on the GPU)"
        } else if timestamps {
            "yes, between passes only (bench times with the host clock)"
        } else {
            "no (bench times with the host clock)"
        };
        println!("    timestamps    {timestamp_use}");
        for (name, value) in limit_rows {
            println!("    {name:<38} {value}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}
