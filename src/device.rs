//! `--device cpu|cuda[:N]`. The PyPI libtorch carries CUDA, but the linker
//! drops `libtorch_cuda` from the binary (nothing references it directly), so
//! it is loaded here, only when asked for; a machine without a GPU never needs it.

use anyhow::{bail, Result};
use tch::Device;

pub fn parse(text: &str) -> Result<Device> {
    let ordinal = match text {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match text.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("unknown --device {text:?} (use cpu, cuda or cuda:N)"),
        },
    };
    load_cuda_runtime();
    if !tch::Cuda::is_available() {
        bail!("--device {text}: libtorch sees no CUDA GPU on this machine (use --device cpu)");
    }
    let count = tch::Cuda::device_count() as usize;
    if ordinal >= count {
        bail!("--device {text}: this machine has {count} CUDA device(s)");
    }
    Ok(Device::Cuda(ordinal))
}

fn load_cuda_runtime() {
    // Found through the binary's rpath to the venv's torch/lib. Failure just
    // leaves CUDA unavailable, which the caller reports.
    // SAFETY: dlopen with a constant, NUL-terminated name; the handle is kept for the process.
    let handle = unsafe {
        libc::dlopen(
            c"libtorch_cuda.so".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_GLOBAL,
        )
    };
    if handle.is_null() {
        tracing::debug!("libtorch_cuda.so could not be loaded");
    }
}
