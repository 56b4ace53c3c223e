//! `--device cpu|cuda[:N]`. The PyPI libtorch carries CUDA, but the linker
//! drops `libtorch_cuda` from the binary (nothing references it directly), so
//! it is loaded here, only when asked for; a machine without a GPU never needs it.

use std::str::FromStr;

use anyhow::{bail, Result};
use tch::Device;

/// A device as `--device` names it, checked for spelling when the command
/// line is parsed and for presence when a command resolves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match text.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown --device {text:?} (use cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The libtorch device; an error where this machine has no such GPU.
    pub fn resolve(self) -> Result<Device> {
        let Self::Cuda(ordinal) = self else {
            return Ok(Device::Cpu);
        };
        load_cuda_runtime();
        if !tch::Cuda::is_available() {
            bail!("--device {self}: libtorch sees no CUDA GPU on this machine (use --device cpu)");
        }
        let count = tch::Cuda::device_count() as usize;
        if ordinal >= count {
            bail!("--device {self}: this machine has {count} CUDA device(s)");
        }
        Ok(Device::Cuda(ordinal))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_by_name() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        for bad in ["tpu", "cuda:", "cuda:-1", "CPU", "cuda:x"] {
            let error = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(error.starts_with("unknown --device"), "{bad}: {error}");
        }
    }
}
