//! Device names as users write them: `cpu`, `cuda`, `cuda:N`, `auto`.

use anyhow::{bail, Context, Result};
use tch::Device;

/// Parses a device name; `auto` is the first CUDA device when there is one, else the CPU.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    let device =
        match name.as_str() {
            "cpu" => Device::Cpu,
            "auto" => Device::cuda_if_available(),
            "cuda" => Device::Cuda(0),
            other => match other.strip_prefix("cuda:") {
                Some(index) => Device::Cuda(index.parse::<usize>().with_context(|| {
                    format!("bad device `{name}`: `{index}` is not a GPU index")
                })?),
                None => bail!("unknown device `{name}` (expected cpu, cuda, cuda:N or auto)"),
            },
        };
    check_available(device)?;
    Ok(device)
}

/// Fails with a clear message when `device` is a GPU this process cannot use.
pub fn check_available(device: Device) -> Result<()> {
    if let Device::Cuda(index) = device {
        let count = tch::Cuda::device_count();
        if count == 0 {
            bail!("device cuda:{index} requested but no CUDA device is available");
        }
        if index as i64 >= count {
            bail!("device cuda:{index} requested but only {count} CUDA device(s) exist");
        }
    }
    Ok(())
}

/// The name PyTorch would print for `device` (`cpu`, `cuda:0`).
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
