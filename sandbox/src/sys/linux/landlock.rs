//! Landlock: the kernel's ABI version, and a rule set built and enforced on the calling
//! process from the [`LandlockRules`] of its sandbox.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::{cpath, errno};
use crate::sys::{LandlockRules, StepError, StepResult};

// Landlock's ABI (include/uapi/linux/landlock.h), called directly: the crate's compatibility
// layer costs two extra stats and an ABI query per rule set, in every start.
mod ll {
    pub const EXECUTE: u64 = 1 << 0;
    pub const WRITE_FILE: u64 = 1 << 1;
    pub const READ_FILE: u64 = 1 << 2;
    pub const READ_DIR: u64 = 1 << 3;
    /// `REMOVE_DIR` through `MAKE_SYM`: every right of ABI 1.
    pub const ALL_V1: u64 = (1 << 13) - 1;
    pub const REFER: u64 = 1 << 13;
    pub const TRUNCATE: u64 = 1 << 14;
    pub const IOCTL_DEV: u64 = 1 << 15;
    pub const BIND_TCP: u64 = 1 << 0;
    pub const CONNECT_TCP: u64 = 1 << 1;
    pub const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    pub const SCOPE_SIGNAL: u64 = 1 << 1;
    pub const RULE_PATH_BENEATH: libc::c_int = 1;
    pub const RULE_NET_PORT: libc::c_int = 2;
    pub const CREATE_RULESET_VERSION: u32 = 1 << 0;

    #[repr(C)]
    pub struct RulesetAttr {
        pub handled_access_fs: u64,
        pub handled_access_net: u64,
        pub scoped: u64,
    }

    #[repr(C, packed)]
    pub struct PathBeneathAttr {
        pub allowed_access: u64,
        pub parent_fd: i32,
    }

    #[repr(C)]
    pub struct NetPortAttr {
        pub allowed_access: u64,
        pub port: u64,
    }

    /// Every file-system right the kernel of `abi` knows.
    pub fn fs_all(abi: u32) -> u64 {
        let mut all = if abi >= 1 { ALL_V1 } else { 0 };
        if abi >= 2 {
            all |= REFER;
        }
        if abi >= 3 {
            all |= TRUNCATE;
        }
        if abi >= 5 {
            all |= IOCTL_DEV;
        }
        all
    }

    /// The rights that apply to a file (the others are about directories).
    pub const FILE_ONLY: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;

    /// The uapi structs a rule is made of (`add_rule` takes nothing else).
    pub trait RuleAttr {}
    impl RuleAttr for PathBeneathAttr {}
    impl RuleAttr for NetPortAttr {}

    /// `landlock_add_rule` of `rule` to `ruleset`: 0, or -1 with errno set.
    pub fn add_rule<R: RuleAttr>(
        ruleset: &std::os::fd::OwnedFd,
        rule_type: libc::c_int,
        rule: &R,
    ) -> libc::c_long {
        use std::os::fd::AsRawFd;
        // SAFETY: `rule` is one of the rule attribute structs of the uapi (`RuleAttr`), and
        // callers pass the rule type that names it; the kernel only reads it; the ruleset fd
        // is open (and so is a path rule's parent fd, held by the caller).
        unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset.as_raw_fd(),
                rule_type,
                rule as *const R,
                0u32,
            )
        }
    }
}

/// The kernel's Landlock ABI version, 0 without Landlock. Asked once per process, by the node
/// (never by a child sharing its memory: the answer is cached).
pub(crate) fn landlock_abi() -> u32 {
    static ABI: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ABI.get_or_init(|| {
        // SAFETY: with a null attribute, size 0 and the VERSION flag, the call only returns
        // the ABI version.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<ll::RulesetAttr>(),
                0usize,
                ll::CREATE_RULESET_VERSION,
            )
        };
        u32::try_from(ret).unwrap_or(0)
    })
}

/// Enforces `rules` with what the kernel's ABI offers (file system from ABI 1, TCP ports from
/// 4, abstract socket and signal scoping from 6); without Landlock at all, nothing.
pub(super) fn apply_landlock(rules: &LandlockRules) -> StepResult {
    let abi = rules.abi;
    if abi == 0 {
        return Ok(());
    }
    let fail = |step: &'static str, path: Option<&Path>| StepError::new(step, path, errno());
    let fs_all = ll::fs_all(abi);
    let attr = ll::RulesetAttr {
        handled_access_fs: fs_all,
        handled_access_net: if abi >= 4 {
            ll::BIND_TCP | ll::CONNECT_TCP
        } else {
            0
        },
        scoped: if abi >= 6 {
            ll::SCOPE_ABSTRACT_UNIX_SOCKET | ll::SCOPE_SIGNAL
        } else {
            0
        },
    };
    // SAFETY: `attr` is a valid ruleset_attr of the size passed (fields an older kernel does
    // not know are zero, which it accepts); the kernel only reads it.
    let ruleset = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const ll::RulesetAttr,
            std::mem::size_of::<ll::RulesetAttr>(),
            0u32,
        )
    };
    if ruleset < 0 {
        return Err(fail("landlock", None));
    }
    // SAFETY: the kernel just made this fd, owned by nobody else; closed when dropped.
    let ruleset = unsafe { OwnedFd::from_raw_fd(ruleset as RawFd) };
    let read = ll::READ_FILE | ll::READ_DIR;
    let sets: [(&Vec<std::path::PathBuf>, u64); 5] = [
        (&rules.read_exec, read | ll::EXECUTE),
        (&rules.read, read),
        (&rules.read_write, fs_all),
        (
            &rules.devices,
            ll::READ_FILE | ll::WRITE_FILE | ll::TRUNCATE | ll::READ_DIR,
        ),
        (&rules.list, ll::READ_DIR),
    ];
    for (paths, access) in sets {
        for path in paths {
            let cpath = cpath(path, "landlock open")?;
            // SAFETY: `cpath` is NUL-terminated; O_PATH opens without reading anything.
            let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(fail("landlock open", Some(path)));
            }
            // SAFETY: the fd was just opened and is owned here alone; closed when dropped.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
            // SAFETY: `st` is writable and of the size fstat fills.
            if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
                return Err(fail("landlock open", Some(path)));
            }
            // SAFETY: fstat succeeded and filled `st`.
            let is_dir = unsafe { st.assume_init() }.st_mode & libc::S_IFMT == libc::S_IFDIR;
            // Directory-only rights cannot be granted on a file; none the kernel lacks.
            let mut allowed = access & fs_all;
            if !is_dir {
                allowed &= ll::FILE_ONLY;
            }
            if allowed == 0 {
                continue;
            }
            let rule = ll::PathBeneathAttr {
                allowed_access: allowed,
                parent_fd: fd.as_raw_fd(),
            };
            if ll::add_rule(&ruleset, ll::RULE_PATH_BENEATH, &rule) != 0 {
                return Err(fail("landlock", Some(path)));
            }
        }
    }
    if abi >= 4 {
        for port in &rules.tcp_connect_ports {
            let rule = ll::NetPortAttr {
                allowed_access: ll::CONNECT_TCP,
                port: u64::from(*port),
            };
            if ll::add_rule(&ruleset, ll::RULE_NET_PORT, &rule) != 0 {
                return Err(fail("landlock", None));
            }
        }
    }
    // no_new_privs is set by the step before.
    // SAFETY: restrict_self takes the ruleset fd and flags.
    let ret = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) };
    if ret != 0 {
        return Err(fail("landlock", None));
    }
    Ok(())
}
