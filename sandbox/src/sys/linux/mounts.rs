//! Mounts: the setup steps that build a sandbox's file system (tmpfs, binds, proc, the
//! read-only tree, `pivot_root`), on `mount(2)` with optional arguments and the flags a
//! read-only remount must keep.

use std::ffi::{CStr, CString};
use std::fs::{DirBuilder, File};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use super::{check, cpath, errno, io_errno};
use crate::sys::{StepError, StepResult, TmpfsFlags};

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

/// [`Syscalls::make_mounts_private`](crate::sys::Syscalls::make_mounts_private) on the real kernel.
pub(super) fn make_mounts_private() -> StepResult {
    let ret = mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None);
    check(ret, "make / private", Some(Path::new("/")))
}

/// [`Syscalls::mount_tmpfs`](crate::sys::Syscalls::mount_tmpfs) on the real kernel.
pub(super) fn mount_tmpfs(target: &Path, data: &str, flags: TmpfsFlags) -> StepResult {
    let step = "mount tmpfs";
    let ctarget = cpath(target, step)?;
    let cdata = CString::new(data).map_err(|_| StepError::new(step, Some(target), libc::EINVAL))?;
    let mut ms = libc::MS_NOSUID | libc::MS_NODEV;
    if flags.read_only {
        ms |= libc::MS_RDONLY;
    }
    if flags.no_exec {
        ms |= libc::MS_NOEXEC;
    }
    let ret = mount(Some(c"tmpfs"), &ctarget, Some(c"tmpfs"), ms, Some(&cdata));
    check(ret, step, Some(target))
}

/// [`Syscalls::make_dir`](crate::sys::Syscalls::make_dir) on the real kernel.
pub(super) fn make_dir(path: &Path) -> StepResult {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|e| StepError::new("mkdir", Some(path), io_errno(&e)))
}

/// [`Syscalls::make_file`](crate::sys::Syscalls::make_file) on the real kernel.
pub(super) fn make_file(path: &Path, contents: &[u8]) -> StepResult {
    File::create(path)
        .and_then(|mut f| f.write_all(contents))
        .map_err(|e| StepError::new("create file", Some(path), io_errno(&e)))
}

/// [`Syscalls::make_symlink`](crate::sys::Syscalls::make_symlink) on the real kernel.
pub(super) fn make_symlink(target: &Path, link: &Path) -> StepResult {
    std::os::unix::fs::symlink(target, link)
        .map_err(|e| StepError::new("symlink", Some(link), io_errno(&e)))
}

/// [`Syscalls::bind_mount`](crate::sys::Syscalls::bind_mount) on the real kernel.
pub(super) fn bind_mount(source: &Path, target: &Path, read_only: bool) -> StepResult {
    let csource = cpath(source, "bind mount")?;
    let ctarget = cpath(target, "bind mount")?;
    // Recursive: a user namespace may not bind a mount without the mounts locked under it.
    let ret = mount(
        Some(&csource),
        &ctarget,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    );
    check(ret, "bind mount", Some(source))?;
    if read_only {
        let kept = preserved_mount_flags(&ctarget)
            .map_err(|e| StepError::new("statvfs", Some(target), e))?;
        let flags = libc::MS_BIND
            | libc::MS_REMOUNT
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | kept;
        let ret = mount(None, &ctarget, None, flags, None);
        check(ret, "remount bind read-only", Some(target))?;
    }
    Ok(())
}

/// [`Syscalls::bind_mount_exact`](crate::sys::Syscalls::bind_mount_exact) on the real kernel.
pub(super) fn bind_mount_exact(source: &Path, target: &Path) -> StepResult {
    let csource = cpath(source, "open bind source")?;
    let ctarget = cpath(target, "bind mount")?;
    // SAFETY: open_how is plain integers, for which all zeros is valid (and asks for
    // nothing).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: the path is NUL-terminated and `how` is a valid open_how whose size is
    // passed; the returned fd is closed below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            csource.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(StepError::new("open bind source", Some(source), errno()));
    }
    let fd = fd as libc::c_int;
    // The magic link names the object opened above, whatever the path names now.
    let via = CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number");
    let ret = mount(
        Some(&via),
        &ctarget,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    );
    let result = check(ret, "bind mount", Some(source));
    // SAFETY: fd was opened above and is not used after this.
    unsafe { libc::close(fd) };
    result
}

/// [`Syscalls::mount_proc`](crate::sys::Syscalls::mount_proc) on the real kernel.
pub(super) fn mount_proc(target: &Path, pid_only: bool) -> Result<bool, StepError> {
    let ctarget = cpath(target, "mount proc")?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if pid_only {
        let ret = mount(
            Some(c"proc"),
            &ctarget,
            Some(c"proc"),
            flags,
            Some(c"subset=pid"),
        );
        if ret == 0 {
            return Ok(true);
        }
        // A kernel before 5.8 does not know the option: a full /proc, masked instead.
        let e = errno();
        if e != libc::EINVAL {
            return Err(StepError::new("mount proc", Some(target), e));
        }
    }
    let ret = mount(Some(c"proc"), &ctarget, Some(c"proc"), flags, None);
    check(ret, "mount proc", Some(target)).map(|()| false)
}

/// [`Syscalls::make_tree_read_only`](crate::sys::Syscalls::make_tree_read_only) on the real kernel.
pub(super) fn make_tree_read_only(target: &Path) -> StepResult {
    /// `struct mount_attr` of `mount_setattr(2)`.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
    let ctarget = cpath(target, "make read-only")?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `ctarget` is NUL-terminated and `attr` is a valid mount_attr whose size is
    // passed; the kernel only reads both.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            ctarget.as_ptr(),
            libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check(ret as libc::c_int, "make read-only", Some(target))
}

/// [`Syscalls::pivot_root`](crate::sys::Syscalls::pivot_root) on the real kernel.
pub(super) fn pivot_root(new_root: &Path) -> StepResult {
    let croot = cpath(new_root, "pivot_root")?;
    // SAFETY: NUL-terminated path.
    let ret = unsafe { libc::chdir(croot.as_ptr()) };
    check(ret, "chdir new root", Some(new_root))?;
    // pivot_root(".", ".") stacks the old root on top of the new one, so no directory for
    // it is needed in the (read-only) new root; detaching "." then drops the old root.
    // SAFETY: both arguments are NUL-terminated strings.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    check(ret as libc::c_int, "pivot_root", Some(new_root))?;
    // SAFETY: NUL-terminated path and a valid flag.
    let ret = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
    check(ret, "detach old root", None)?;
    // The function's working directory is its code; `/` if there is none.
    // SAFETY: NUL-terminated path.
    let ret = unsafe { libc::chdir(c"/code".as_ptr()) };
    if ret == 0 {
        return Ok(());
    }
    // SAFETY: NUL-terminated path.
    let ret = unsafe { libc::chdir(c"/".as_ptr()) };
    check(ret, "chdir /", None)
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
