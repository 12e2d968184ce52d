//! Attaching the seccomp filters compiled for a sandbox.

use seccompiler::BpfProgram;

use super::io_errno;
use crate::sys::{StepError, StepResult};

/// [`Syscalls::seccomp`](crate::sys::Syscalls::seccomp) on the real kernel.
pub(super) fn seccomp(filters: &[BpfProgram]) -> StepResult {
    for filter in filters {
        seccompiler::apply_filter(filter).map_err(|e| {
            let errno = match e {
                seccompiler::Error::Seccomp(io) => io_errno(&io),
                seccompiler::Error::Prctl(io) => io_errno(&io),
                _ => libc::EINVAL,
            };
            StepError::new("seccomp", None, errno)
        })?;
    }
    Ok(())
}
