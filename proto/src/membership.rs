//! Member lists: `ID=HOST:PORT,ID=HOST:PORT,...`, as `skiff cluster init` and `skiffd restore`
//! take them.
//!
//! Invariants of a parsed list: at least one member, ids from 1 up and each listed once, every
//! address a valid `host:port`, no two members at the same address.

use std::collections::BTreeMap;

use crate::api::NodeId;
use crate::transport;

/// Why a member list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembersError {
    #[error("member {part:?} is not ID=HOST:PORT")]
    NotIdAndAddress { part: String },
    #[error("member {part:?} has an invalid id {id:?}")]
    InvalidId { part: String, id: String },
    #[error("node id 0 is reserved; ids start at 1")]
    ZeroId,
    /// The address is not `host:port`; the message says why.
    #[error("{0}")]
    InvalidAddress(String),
    #[error("node id {0} is listed twice")]
    DuplicateId(NodeId),
    #[error("no members given")]
    Empty,
    #[error("two members share an address")]
    SharedAddress,
}

/// Parses `1=127.0.0.1:7001,2=...` into a member map.
pub fn parse_members(s: &str) -> Result<BTreeMap<NodeId, String>, MembersError> {
    let mut members = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| MembersError::NotIdAndAddress {
                part: part.to_string(),
            })?;
        let id: NodeId = id.parse().map_err(|_| MembersError::InvalidId {
            part: part.to_string(),
            id: id.to_string(),
        })?;
        if id == 0 {
            return Err(MembersError::ZeroId);
        }
        transport::parse_endpoint(addr).map_err(MembersError::InvalidAddress)?;
        if members.insert(id, addr.to_string()).is_some() {
            return Err(MembersError::DuplicateId(id));
        }
    }
    if members.is_empty() {
        return Err(MembersError::Empty);
    }
    let mut addrs: Vec<&String> = members.values().collect();
    addrs.sort();
    if addrs.windows(2).any(|w| w[0] == w[1]) {
        return Err(MembersError::SharedAddress);
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bad_list_is_refused_for_its_own_reason() {
        let m = parse_members(" 1=127.0.0.1:7001, 2=127.0.0.1:7002,").expect("valid");
        assert_eq!(m.len(), 2);
        assert_eq!(m[&1], "127.0.0.1:7001");
        let refused = |bad: &str| parse_members(bad).expect_err(bad);
        assert_eq!(refused(""), MembersError::Empty);
        assert_eq!(
            refused("1"),
            MembersError::NotIdAndAddress { part: "1".into() }
        );
        assert_eq!(
            refused("x=127.0.0.1:1"),
            MembersError::InvalidId {
                part: "x=127.0.0.1:1".into(),
                id: "x".into()
            }
        );
        assert_eq!(refused("0=127.0.0.1:1"), MembersError::ZeroId);
        assert!(matches!(
            refused("1=127.0.0.1"),
            MembersError::InvalidAddress(_)
        ));
        assert_eq!(refused("1=a:1,1=b:2"), MembersError::DuplicateId(1));
        assert_eq!(refused("1=a:1,2=a:1"), MembersError::SharedAddress);
        assert_eq!(
            parse_members("x=a:1").expect_err("bad id").to_string(),
            "member \"x=a:1\" has an invalid id \"x\""
        );
    }
}
