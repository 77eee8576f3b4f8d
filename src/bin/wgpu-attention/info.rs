//! `info`: every adapter with the features and limits the kernels depend on.

use std::process::ExitCode;

use serde_json::json;

#[derive(clap::Args)]
pub(crate) struct InfoArgs {
    /// Print one JSON object per adapter instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &InfoArgs) -> Result<ExitCode, wgpu_attention::Error> {
    let adapters = wgpu_attention::enumerate_adapters();
    if adapters.is_empty() {
        return Err(wgpu_attention::Error::NoAdapter);
    }
    for (index, adapter) in adapters.iter().enumerate() {
        let info = adapter.get_info();
        let features = adapter.features();
        let limits = adapter.limits();
        let f16 = features.contains(wgpu::Features::SHADER_F16);
        let int64 = features.contains(wgpu::Features::SHADER_INT64);
        let subgroups = features.contains(wgpu::Features::SUBGROUP);
        let timestamps = features.contains(wgpu::Features::TIMESTAMP_QUERY);
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
                "name": info.name,
                "backend": wgpu_attention::backend_name(info.backend),
                "device_type": format!("{:?}", info.device_type),
                "driver": crate::driver_name(&info),
                "driver_info": info.driver_info,
                "shader_f16": f16,
                "shader_int64": int64,
                "subgroups": subgroups,
                "subgroup_min_size": info.subgroup_min_size,
                "subgroup_max_size": info.subgroup_max_size,
                "timestamp_query": timestamps,
                "limits": limits_json,
            });
            println!("{object}");
            continue;
        }
        println!("[{index}] {}", info.name);
        println!(
            "    backend       {}",
            wgpu_attention::backend_name(info.backend)
        );
        println!("    device type   {:?}", info.device_type);
        println!("    driver        {}", crate::driver_label(&info));
        println!("    SHADER_F16    {}", yes_no(f16));
        println!("    SHADER_INT64  {}", yes_no(int64));
        if subgroups {
            println!(
                "    subgroups     yes, size {} to {}",
                info.subgroup_min_size, info.subgroup_max_size
            );
        } else {
            println!("    subgroups     no");
        }
        println!("    timestamps    {}", yes_no(timestamps));
        for (name, value) in limit_rows {
            println!("    {name:<38} {value}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}
