//! The host uids and gids that sandboxes run as: one range, set by the node from its
//! configuration, which no local user may own or be delegated.
//!
//! The first id of the range is the group every sandbox runs as (the group that may reach the
//! data-service sockets); each sandbox takes a uid from the rest, so two sandboxes of one node
//! process rarely share a uid and never share one with a local user.
//!
//! Invariant: a [`HostIdRange`] lies within `65536..u32::MAX` (no system id, `nobody`, or the
//! invalid id `-1`) and holds a group and at least one uid.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// The range of host ids sandboxes use, `start..start + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostIdRange {
    start: u32,
    count: u32,
}

/// Lowest id a range may start at: below are the system's ids, `nobody` (65534) and the 16-bit
/// invalid id.
pub const HOST_ID_START_MIN: u32 = 65_536;
/// Fewest ids in a range: the shared group and one uid.
pub const HOST_ID_COUNT_MIN: u32 = 2;

impl HostIdRange {
    /// `0x7000_0000:65536`: just above the block that systemd hands to containers
    /// (524288–1879048191, `--private-users=pick`) and far above the ranges `useradd` gives in
    /// `/etc/subuid` (from 100000, 65536 a user), below the block systemd keeps for foreign
    /// ids (from 0x7FFE0000) and below 2^31, past which some tools misread ids as negative.
    pub const DEFAULT: HostIdRange = HostIdRange {
        start: 0x7000_0000,
        count: 65_536,
    };

    pub fn new(start: u32, count: u32) -> Result<Self, HostIdError> {
        if start < HOST_ID_START_MIN {
            return Err(HostIdError::Invalid(format!(
                "start {start} is below {HOST_ID_START_MIN} (system ids and nobody)"
            )));
        }
        if count < HOST_ID_COUNT_MIN {
            return Err(HostIdError::Invalid(format!(
                "count {count} is below {HOST_ID_COUNT_MIN} (one group and one uid)"
            )));
        }
        if u64::from(start) + u64::from(count) > u64::from(u32::MAX) {
            return Err(HostIdError::Invalid(format!(
                "{start}:{count} reaches {} (the invalid id)",
                u32::MAX
            )));
        }
        Ok(Self { start, count })
    }

    pub fn start(&self) -> u32 {
        self.start
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// The gid every sandbox runs as.
    pub fn group(&self) -> u32 {
        self.start
    }

    /// The uids sandboxes take, one each.
    pub fn uids(&self) -> Range<u32> {
        self.start + 1..self.start + self.count
    }

    /// Whether any id of the range is in `start..start + count`.
    pub fn overlaps(&self, start: u64, count: u64) -> bool {
        let (ours, end) = (
            u64::from(self.start),
            u64::from(self.start) + u64::from(self.count),
        );
        count > 0 && start < end && ours < start.saturating_add(count)
    }

    /// Checks that no entry of a subordinate-id file (`name:start:count` lines, as in
    /// `/etc/subuid`) overlaps the range; `text` is the file's contents, `path` its name in the
    /// error. Blank lines and `#` comments are skipped; a malformed line is an error, since
    /// what it delegates cannot be known.
    pub fn check_subordinate_ids(&self, path: &Path, text: &str) -> Result<(), HostIdError> {
        for (index, line) in text.lines().enumerate() {
            let entry = line.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = entry.split(':').collect();
            let parsed = match fields.as_slice() {
                [_, start, count] => start.parse::<u64>().ok().zip(count.parse::<u64>().ok()),
                _ => None,
            };
            let Some((start, count)) = parsed else {
                return Err(HostIdError::Malformed {
                    path: path.to_path_buf(),
                    line: index + 1,
                    entry: entry.to_string(),
                });
            };
            if self.overlaps(start, count) {
                return Err(HostIdError::Overlap {
                    range: *self,
                    path: path.to_path_buf(),
                    line: index + 1,
                    entry: entry.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Checks that no account of a `passwd` or `group` file (`:`-separated, the ids in the
    /// fields numbered `id_fields` from 0) has an id in the range.
    pub fn check_account_ids(
        &self,
        path: &Path,
        text: &str,
        id_fields: &[usize],
    ) -> Result<(), HostIdError> {
        for (index, line) in text.lines().enumerate() {
            let entry = line.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = entry.split(':').collect();
            for field in id_fields {
                let id = fields.get(*field).and_then(|f| f.parse::<u64>().ok());
                if id.is_some_and(|id| self.overlaps(id, 1)) {
                    return Err(HostIdError::Overlap {
                        range: *self,
                        path: path.to_path_buf(),
                        line: index + 1,
                        entry: entry.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// [`HostIdRange::check_subordinate_ids`] on `/etc/subuid` and `/etc/subgid`, and
    /// [`HostIdRange::check_account_ids`] on `/etc/passwd` and `/etc/group`; a file that does
    /// not exist names nobody.
    pub fn check_host(&self) -> Result<(), HostIdError> {
        for (path, fields) in [
            ("/etc/subuid", None),
            ("/etc/subgid", None),
            ("/etc/passwd", Some(&[2usize, 3][..])),
            ("/etc/group", Some(&[2usize][..])),
        ] {
            let path = Path::new(path);
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(HostIdError::Read {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            };
            match fields {
                None => self.check_subordinate_ids(path, &text)?,
                Some(fields) => self.check_account_ids(path, &text, fields)?,
            }
        }
        Ok(())
    }
}

impl Default for HostIdRange {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for HostIdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.start, self.count)
    }
}

impl FromStr for HostIdRange {
    type Err = HostIdError;
    /// `START:COUNT`, both decimal.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || HostIdError::Invalid(format!("{s:?} is not START:COUNT"));
        let (start, count) = s.split_once(':').ok_or_else(bad)?;
        let start = start.trim().parse().map_err(|_| bad())?;
        let count = count.trim().parse().map_err(|_| bad())?;
        Self::new(start, count)
    }
}

impl serde::Serialize for HostIdRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for HostIdRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A host id range that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostIdError {
    #[error("invalid sandbox host id range: {0}")]
    Invalid(String),
    #[error(
        "sandbox host id range {range} overlaps {} line {line} ({entry:?}): that account, or \
         its user namespaces, could own a sandbox's ids; choose another range \
         ([sandbox] host_ids)",
        path.display()
    )]
    Overlap {
        range: HostIdRange,
        path: PathBuf,
        line: usize,
        entry: String,
    },
    #[error("{} line {line} is not name:start:count: {entry:?}", path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        entry: String,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

static RANGE: AtomicU64 = AtomicU64::new(pack(HostIdRange::DEFAULT));

const fn pack(range: HostIdRange) -> u64 {
    ((range.start as u64) << 32) | range.count as u64
}

/// Sets the range every later sandbox of this process takes its ids from (the node does so at
/// start, from its configuration, after [`HostIdRange::check_host`]).
pub fn set_host_id_range(range: HostIdRange) {
    RANGE.store(pack(range), Ordering::Relaxed);
}

/// The range sandboxes take their ids from now.
pub fn host_id_range() -> HostIdRange {
    let packed = RANGE.load(Ordering::Relaxed);
    HostIdRange {
        start: (packed >> 32) as u32,
        count: packed as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_system_ids() {
        let range: HostIdRange = "2000000000:1000".parse().expect("valid");
        assert_eq!(range.group(), 2_000_000_000);
        assert_eq!(range.uids(), 2_000_000_001..2_000_001_000);
        assert_eq!(range.to_string(), "2000000000:1000");
        for bad in [
            "",
            "5",
            "100000",
            "0:10",
            "65534:10",
            "70000:1",
            "x:1",
            "4294967000:1000",
        ] {
            assert!(bad.parse::<HostIdRange>().is_err(), "{bad}");
        }
        assert_eq!(HostIdRange::default(), HostIdRange::DEFAULT);
        let d = HostIdRange::DEFAULT;
        assert!(HostIdRange::new(d.start(), d.count()).is_ok());
    }

    #[test]
    fn an_overlapping_subordinate_entry_is_named() {
        let range: HostIdRange = "200000:1000".parse().expect("valid");
        let path = Path::new("/etc/subuid");
        let text = "# comment\n\nroot:100000:65536\nalice:165536:65536\nbob:231072:65536\n";
        let err = range
            .check_subordinate_ids(path, text)
            .expect_err("alice's range holds 200000");
        let message = err.to_string();
        assert!(message.contains("/etc/subuid line 4"), "{message}");
        assert!(message.contains("alice:165536:65536"), "{message}");
        // Adjacent ranges do not overlap; the default is clear of the usual allocations.
        let range = HostIdRange::new(296_608, 10).expect("valid");
        assert!(range.check_subordinate_ids(path, text).is_ok());
        assert!(HostIdRange::DEFAULT
            .check_subordinate_ids(path, text)
            .is_ok());
        let err = HostIdRange::DEFAULT
            .check_subordinate_ids(path, "x:1879048191:2\n")
            .expect_err("the last id of the entry is the group");
        assert!(matches!(err, HostIdError::Overlap { line: 1, .. }));
        assert!(matches!(
            HostIdRange::DEFAULT.check_subordinate_ids(path, "alice:100000\n"),
            Err(HostIdError::Malformed { line: 1, .. })
        ));
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\ncarol:x:1879048200:100::/home/carol:/bin/sh\n";
        let err = HostIdRange::DEFAULT
            .check_account_ids(Path::new("/etc/passwd"), passwd, &[2, 3])
            .expect_err("carol's uid is in the range");
        assert!(err.to_string().contains("/etc/passwd line 2"), "{err}");
        assert!(HostIdRange::DEFAULT
            .check_account_ids(Path::new("/etc/passwd"), "root:x:0:0::/:/bin/sh\n", &[2, 3])
            .is_ok());
        // This machine's files pass with the default range, as a node's start needs.
        HostIdRange::DEFAULT
            .check_host()
            .expect("the default range is free here");
    }
}
