//! Mounts: `mount(2)` with optional arguments, and the flags a read-only remount must keep.

use std::ffi::CStr;

use super::errno;

/// `mount(2)` with optional arguments.
pub(super) fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> libc::c_int {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is either null (allowed by mount(2) for these arguments) or a
    // NUL-terminated string that outlives the call.
    unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    }
}

/// Mount flags of `path` that a read-only remount must keep (a user namespace may not clear
/// locked flags such as nosuid, nodev, noexec and the atime mode).
pub(super) fn preserved_mount_flags(path: &CStr) -> Result<libc::c_ulong, i32> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `st` points to writable memory of the right size.
    let ret = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if ret == -1 {
        return Err(errno());
    }
    // SAFETY: statvfs returned 0, so it filled the structure.
    let st = unsafe { st.assume_init() };
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::super::RealSys;
    use crate::sys::Syscalls;
    use std::io;

    /// A bind of a checked real path binds that object or nothing: once a directory on the way
    /// is swapped for a symlink (as a race between the check and the bind would), the bind
    /// fails instead of following it. Runs in a thread of its own mount namespace.
    #[test]
    fn an_exact_bind_refuses_a_path_that_gained_a_symlink() {
        // SAFETY: geteuid takes no arguments.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: mounting needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let checked = dir.path().join("checked");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&checked).expect("mkdir");
        std::fs::create_dir(&elsewhere).expect("mkdir");
        std::fs::write(checked.join("file"), "checked").expect("write");
        std::fs::write(elsewhere.join("file"), "elsewhere").expect("write");
        let target = dir.path().join("target");
        std::fs::write(&target, "").expect("write");
        let source = checked.join("file");
        let result = std::thread::spawn(move || {
            // SAFETY: unshare takes flags only; a mount namespace is per thread here.
            let ret = unsafe { libc::unshare(libc::CLONE_NEWNS) };
            assert_eq!(ret, 0, "unshare: {}", io::Error::last_os_error());
            let mut sys = RealSys::new(None, false);
            sys.make_mounts_private().expect("private");
            sys.bind_mount_exact(&source, &target)
                .expect("a real path binds");
            let first = std::fs::read_to_string(&target).expect("read");
            // The check saw `checked`; now it leads elsewhere.
            std::fs::rename(&checked, checked.with_extension("old")).expect("rename");
            std::os::unix::fs::symlink(&elsewhere, &checked).expect("symlink");
            let second = sys.bind_mount_exact(&source, &target);
            let now = std::fs::read_to_string(&target).expect("read");
            (first, second, now)
        })
        .join()
        .expect("thread");
        assert_eq!(result.0, "checked");
        let err = result.1.expect_err("a symlink on the way is refused");
        assert_eq!(err.errno, libc::ELOOP);
        assert_eq!(result.2, "checked", "nothing else was bound");
    }
}
