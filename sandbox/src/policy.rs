//! Tiers (fixed presets of isolation and limits) and policies (TOML files that narrow a tier).
//!
//! Invariant: a resolved [`Limits`] is never wider than its tier's preset. `Policy::resolve`
//! is the only way from a policy to limits, and it refuses, with a [`PolicyError`] naming the
//! field, anything that would widen the tier.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::PolicyError;

const MIB: u64 = 1024 * 1024;

/// How much the code in a sandbox is trusted. Every tier runs in all the layers; they differ in
/// limits, in the host paths they see, and in the network (see `docs/security.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Code from anyone: smallest limits, no network, minimal host paths.
    Untrusted,
    /// Code from the cluster's deployers: larger limits, no network, TLS roots visible.
    Standard,
    /// Code from operators: the host's network namespace, TCP connect only to ports the
    /// policy lists, bind never.
    Trusted,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Untrusted, Tier::Standard, Tier::Trusted];

    /// The tier's preset: its defaults, which are also the most a policy can ask for.
    pub fn limits(self) -> Limits {
        let base_paths = [
            "/usr",
            "/bin",
            "/sbin",
            "/lib",
            "/lib64",
            "/etc/ld.so.cache",
        ];
        let mut readable_paths: Vec<PathBuf> = base_paths.iter().map(PathBuf::from).collect();
        match self {
            Tier::Untrusted => Limits {
                tier: self,
                readable_paths,
                writable_paths: vec![PathBuf::from("/tmp")],
                tcp_connect_ports: Vec::new(),
                memory_bytes_max: 256 * MIB,
                cpu_millis_max: 1000,
                pids_max: 64,
                timeout_ms: 10_000,
                stdout_bytes_max: MIB,
                stderr_bytes_max: 256 * 1024,
                tmp_bytes_max: 16 * MIB,
                open_files_max: 256,
            },
            Tier::Standard => {
                readable_paths.extend(["/etc/ssl", "/etc/ca-certificates"].map(PathBuf::from));
                Limits {
                    tier: self,
                    readable_paths,
                    writable_paths: vec![PathBuf::from("/tmp")],
                    tcp_connect_ports: Vec::new(),
                    memory_bytes_max: 512 * MIB,
                    cpu_millis_max: 1000,
                    pids_max: 256,
                    timeout_ms: 60_000,
                    stdout_bytes_max: 8 * MIB,
                    stderr_bytes_max: MIB,
                    tmp_bytes_max: 64 * MIB,
                    open_files_max: 1024,
                }
            }
            Tier::Trusted => {
                readable_paths.extend(
                    ["/etc/ssl", "/etc/ca-certificates", "/etc/resolv.conf"].map(PathBuf::from),
                );
                Limits {
                    tier: self,
                    readable_paths,
                    writable_paths: vec![PathBuf::from("/tmp")],
                    tcp_connect_ports: Vec::new(),
                    memory_bytes_max: 2048 * MIB,
                    cpu_millis_max: 2000,
                    pids_max: 1024,
                    timeout_ms: 600_000,
                    stdout_bytes_max: 64 * MIB,
                    stderr_bytes_max: 8 * MIB,
                    tmp_bytes_max: 512 * MIB,
                    open_files_max: 4096,
                }
            }
        }
    }

    /// Whether the tier keeps the host's network namespace (restricted by Landlock TCP rules).
    pub fn host_network(self) -> bool {
        matches!(self, Tier::Trusted)
    }

    /// Whether the sandbox's `/proc` is a full one (masked). Below the trusted tier it holds
    /// only the process directories (`subset=pid`), so the host's kernel files are absent
    /// rather than masked.
    pub fn full_proc(self) -> bool {
        matches!(self, Tier::Trusted)
    }

    /// Whether a policy of this tier may list TCP ports to connect to.
    pub fn allows_tcp_connect(self) -> bool {
        matches!(self, Tier::Trusted)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Untrusted => "untrusted",
            Tier::Standard => "standard",
            Tier::Trusted => "trusted",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name is not one of `untrusted`, `standard`, `trusted`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tier {0:?} (expected untrusted, standard or trusted)")]
pub struct UnknownTier(pub String);

impl FromStr for Tier {
    type Err = UnknownTier;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "untrusted" => Ok(Tier::Untrusted),
            "standard" => Ok(Tier::Standard),
            "trusted" => Ok(Tier::Trusted),
            other => Err(UnknownTier(other.to_string())),
        }
    }
}

/// Concrete limits of one sandbox, always within its tier's preset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub tier: Tier,
    /// Host paths bound read-only (and executable) at the same place inside; missing ones are
    /// skipped. `/code` is always added.
    pub readable_paths: Vec<PathBuf>,
    /// Paths inside the sandbox where writes are allowed; only within `/tmp`.
    pub writable_paths: Vec<PathBuf>,
    /// TCP ports the code may connect to (trusted tier only; loopback or anywhere the host
    /// network reaches).
    pub tcp_connect_ports: Vec<u16>,
    pub memory_bytes_max: u64,
    /// CPU quota in thousandths of a core (1000 = one core).
    pub cpu_millis_max: u32,
    /// Processes and threads of the function.
    pub pids_max: u32,
    /// Wall-clock time from hand-off to kill.
    pub timeout_ms: u64,
    pub stdout_bytes_max: u64,
    pub stderr_bytes_max: u64,
    /// Size of the `/tmp` tmpfs (its pages also count against `memory_bytes_max`).
    pub tmp_bytes_max: u64,
    pub open_files_max: u64,
}

impl Limits {
    /// A read-only `/tmp`: no writable path is left.
    pub fn tmp_writable(&self) -> bool {
        !self.writable_paths.is_empty()
    }
}

/// A policy narrows a tier. Every field is optional; an absent field keeps the tier's value.
///
/// ```toml
/// readable_paths = ["/usr", "/lib", "/lib64", "/bin"]
/// writable_paths = ["/tmp"]
/// tcp_connect_ports = [8080]   # trusted tier only
/// memory_bytes_max = 67108864
/// cpu_millis_max = 500
/// pids_max = 16
/// timeout_ms = 2000
/// stdout_bytes_max = 65536
/// stderr_bytes_max = 65536
/// tmp_bytes_max = 1048576
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub readable_paths: Option<Vec<PathBuf>>,
    pub writable_paths: Option<Vec<PathBuf>>,
    pub tcp_connect_ports: Option<Vec<u16>>,
    pub memory_bytes_max: Option<u64>,
    pub cpu_millis_max: Option<u32>,
    pub pids_max: Option<u32>,
    pub timeout_ms: Option<u64>,
    pub stdout_bytes_max: Option<u64>,
    pub stderr_bytes_max: Option<u64>,
    pub tmp_bytes_max: Option<u64>,
    pub open_files_max: Option<u64>,
}

impl Policy {
    /// Parses a policy from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        toml::from_str(text).map_err(PolicyError::Parse)
    }

    /// The tier's preset narrowed by this policy; an error if the policy would widen it.
    pub fn resolve(&self, tier: Tier) -> Result<Limits, PolicyError> {
        let mut limits = tier.limits();
        narrow(
            tier,
            "memory_bytes_max",
            self.memory_bytes_max,
            &mut limits.memory_bytes_max,
        )?;
        let mut cpu = u64::from(limits.cpu_millis_max);
        narrow(
            tier,
            "cpu_millis_max",
            self.cpu_millis_max.map(u64::from),
            &mut cpu,
        )?;
        limits.cpu_millis_max = u32::try_from(cpu).expect("narrowed from a u32 ceiling");
        let mut pids = u64::from(limits.pids_max);
        narrow(tier, "pids_max", self.pids_max.map(u64::from), &mut pids)?;
        limits.pids_max = u32::try_from(pids).expect("narrowed from a u32 ceiling");
        narrow(tier, "timeout_ms", self.timeout_ms, &mut limits.timeout_ms)?;
        narrow(
            tier,
            "stdout_bytes_max",
            self.stdout_bytes_max,
            &mut limits.stdout_bytes_max,
        )?;
        narrow(
            tier,
            "stderr_bytes_max",
            self.stderr_bytes_max,
            &mut limits.stderr_bytes_max,
        )?;
        narrow(
            tier,
            "tmp_bytes_max",
            self.tmp_bytes_max,
            &mut limits.tmp_bytes_max,
        )?;
        narrow(
            tier,
            "open_files_max",
            self.open_files_max,
            &mut limits.open_files_max,
        )?;
        for (field, value) in [
            ("memory_bytes_max", limits.memory_bytes_max),
            ("cpu_millis_max", u64::from(limits.cpu_millis_max)),
            ("pids_max", u64::from(limits.pids_max)),
            ("timeout_ms", limits.timeout_ms),
            ("tmp_bytes_max", limits.tmp_bytes_max),
            ("open_files_max", limits.open_files_max),
        ] {
            if value == 0 {
                return Err(PolicyError::Invalid {
                    field,
                    reason: "must be greater than zero",
                });
            }
        }
        if let Some(paths) = &self.readable_paths {
            limits.readable_paths =
                narrow_paths(tier, "readable", paths, &tier.limits().readable_paths)?;
        }
        if let Some(paths) = &self.writable_paths {
            limits.writable_paths =
                narrow_paths(tier, "writable", paths, &tier.limits().writable_paths)?;
        }
        if let Some(ports) = &self.tcp_connect_ports {
            if !ports.is_empty() && !tier.allows_tcp_connect() {
                return Err(PolicyError::PortsNotAllowed {
                    tier,
                    ports: ports.clone(),
                });
            }
            if ports.contains(&0) {
                return Err(PolicyError::Invalid {
                    field: "tcp_connect_ports",
                    reason: "port 0 is not a port one can connect to",
                });
            }
            limits.tcp_connect_ports = ports.clone();
        }
        Ok(limits)
    }
}

fn narrow(
    tier: Tier,
    field: &'static str,
    requested: Option<u64>,
    value: &mut u64,
) -> Result<(), PolicyError> {
    if let Some(requested) = requested {
        if requested > *value {
            return Err(PolicyError::Widens {
                tier,
                field,
                requested,
                ceiling: *value,
            });
        }
        *value = requested;
    }
    Ok(())
}

fn narrow_paths(
    tier: Tier,
    kind: &'static str,
    requested: &[PathBuf],
    allowed: &[PathBuf],
) -> Result<Vec<PathBuf>, PolicyError> {
    let mut out = Vec::with_capacity(requested.len());
    for path in requested {
        let field = if kind == "readable" {
            "readable_paths"
        } else {
            "writable_paths"
        };
        if !path.is_absolute() {
            return Err(PolicyError::Invalid {
                field,
                reason: "paths must be absolute",
            });
        }
        // `..` would let a path that looks beneath an allowed one point anywhere.
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(PolicyError::Invalid {
                field,
                reason: "paths must not contain . or ..",
            });
        }
        if !allowed.iter().any(|a| is_within(path, a)) {
            return Err(PolicyError::PathNotAllowed {
                tier,
                kind,
                path: path.clone(),
            });
        }
        out.push(path.clone());
    }
    Ok(out)
}

fn is_within(path: &Path, base: &Path) -> bool {
    path.starts_with(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_names_round_trip() {
        for tier in Tier::ALL {
            assert_eq!(tier.as_str().parse::<Tier>(), Ok(tier));
            let toml_text = format!("t = \"{tier}\"");
            #[derive(Deserialize)]
            struct T {
                t: Tier,
            }
            let parsed: T = toml::from_str(&toml_text).expect("valid toml");
            assert_eq!(parsed.t, tier);
        }
        assert!("root".parse::<Tier>().is_err());
    }

    #[test]
    fn empty_policy_is_the_tier_preset() {
        for tier in Tier::ALL {
            assert_eq!(
                Policy::default().resolve(tier).expect("resolves"),
                tier.limits()
            );
        }
    }

    #[test]
    fn policy_narrows() {
        let policy = Policy::from_toml(
            "memory_bytes_max = 1048576\npids_max = 4\nreadable_paths = [\"/usr/lib\"]\ntimeout_ms = 5",
        )
        .expect("parses");
        let limits = policy.resolve(Tier::Untrusted).expect("narrower");
        assert_eq!(limits.memory_bytes_max, 1048576);
        assert_eq!(limits.pids_max, 4);
        assert_eq!(limits.timeout_ms, 5);
        assert_eq!(limits.readable_paths, vec![PathBuf::from("/usr/lib")]);
    }

    #[test]
    fn widening_is_refused_with_the_field() {
        let policy = Policy::from_toml("memory_bytes_max = 99999999999").expect("parses");
        let err = policy.resolve(Tier::Untrusted).expect_err("wider");
        assert!(matches!(
            err,
            PolicyError::Widens {
                field: "memory_bytes_max",
                ..
            }
        ));
        assert!(err.to_string().contains("memory_bytes_max"));

        let policy = Policy::from_toml("readable_paths = [\"/etc\"]").expect("parses");
        assert!(matches!(
            policy.resolve(Tier::Trusted),
            Err(PolicyError::PathNotAllowed { .. })
        ));
        let policy = Policy::from_toml("writable_paths = [\"/usr\"]").expect("parses");
        assert!(matches!(
            policy.resolve(Tier::Trusted),
            Err(PolicyError::PathNotAllowed { .. })
        ));
        let policy = Policy::from_toml("readable_paths = [\"/usr/../etc\"]").expect("parses");
        assert!(matches!(
            policy.resolve(Tier::Trusted),
            Err(PolicyError::Invalid { .. })
        ));
        let policy = Policy::from_toml("tcp_connect_ports = [80]").expect("parses");
        assert!(matches!(
            policy.resolve(Tier::Standard),
            Err(PolicyError::PortsNotAllowed { .. })
        ));
        assert_eq!(
            policy
                .resolve(Tier::Trusted)
                .expect("allowed")
                .tcp_connect_ports,
            vec![80]
        );
        let policy = Policy::from_toml("pids_max = 0").expect("parses");
        assert!(matches!(
            policy.resolve(Tier::Trusted),
            Err(PolicyError::Invalid { .. })
        ));
    }

    #[test]
    fn unknown_fields_are_errors() {
        assert!(matches!(
            Policy::from_toml("memory = 5"),
            Err(PolicyError::Parse(_))
        ));
    }

    #[test]
    fn tiers_are_ordered_by_width() {
        let [u, s, t] = Tier::ALL.map(Tier::limits);
        assert!(
            u.memory_bytes_max <= s.memory_bytes_max && s.memory_bytes_max <= t.memory_bytes_max
        );
        assert!(u.pids_max <= s.pids_max && s.pids_max <= t.pids_max);
        assert!(u
            .readable_paths
            .iter()
            .all(|p| s.readable_paths.contains(p)));
        assert!(s
            .readable_paths
            .iter()
            .all(|p| t.readable_paths.contains(p)));
    }
}
