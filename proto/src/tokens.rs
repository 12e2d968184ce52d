//! Bearer tokens of the control plane as plain data: what a token is, which role it carries,
//! how a secret is checked and hashed. The replicated table of tokens, with its apply, is
//! `skiff_raft_store::token_table`.
//!
//! A token's secret never enters the log: the node that receives a create request draws the
//! secret, and the command carries only its SHA-256 ([`token_hash`]). A secret is at least
//! [`TOKEN_SECRET_BYTES_MIN`] characters of high entropy (32 random bytes, hex), so a plain
//! hash is enough: there is no password to brute-force.
//!
//! Invariants:
//! - a secret is [`TOKEN_SECRET_BYTES_MIN`] to [`TOKEN_SECRET_BYTES_MAX`] printable ASCII
//!   characters; a name at most [`TOKEN_NAME_BYTES_MAX`] bytes; a hash 64 lowercase hex digits;
//! - a token's id is never reused and a record is never deleted (revoked ones stay, flagged),
//!   so at most [`TOKENS_MAX`] records count revoked ones too.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::ids::TokenId;

/// Most token records (revoked ones included) the cluster holds.
pub const TOKENS_MAX: usize = 4096;
/// Longest token name, in bytes.
pub const TOKEN_NAME_BYTES_MAX: usize = 64;
/// Shortest secret a node accepts (a generated secret is 68 characters).
pub const TOKEN_SECRET_BYTES_MIN: usize = 32;
/// Longest secret a node accepts; also the bound of the connection handshake.
pub const TOKEN_SECRET_BYTES_MAX: usize = 128;
/// The prefix of generated secrets, so a leaked one is recognizable in logs and scanners.
pub const TOKEN_SECRET_PREFIX: &str = "skiff_";

/// What a token may do. Each role includes everything the roles below it may do:
/// `Invoker` < `Deployer` < `Admin` (see docs/security.md for the table of calls).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub enum Role {
    /// Invoke functions and read results, functions, streams and keys.
    #[default]
    Invoker,
    /// Also deploy and remove functions, write keys, run streams.
    Deployer,
    /// Everything: also cluster membership, tokens and the `trusted` tier.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Deployer, Role::Invoker];

    /// Whether a token of this role may do what `needed` may.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Deployer => "deployer",
            Role::Invoker => "invoker",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: admin, deployer or invoker"))
    }
}

/// A token as anyone may see it: never its secret, never its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: TokenId,
    pub name: Option<String>,
    pub role: Role,
    /// State-machine time of the entry that created it.
    pub created_ms: u64,
    pub revoked: bool,
    /// State-machine time of the entry that revoked it.
    pub revoked_ms: Option<u64>,
}

/// A token as the state machine stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub info: TokenInfo,
    /// SHA-256 of the secret, hex.
    pub hash: String,
}

/// SHA-256 of a secret, hex: what the log and the table hold.
pub fn token_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Checks a presented or client-chosen secret: printable ASCII without spaces, within the
/// length bounds.
pub fn validate_secret(secret: &str) -> Result<(), String> {
    if secret.len() < TOKEN_SECRET_BYTES_MIN || secret.len() > TOKEN_SECRET_BYTES_MAX {
        return Err(format!(
            "a token is {TOKEN_SECRET_BYTES_MIN} to {TOKEN_SECRET_BYTES_MAX} characters, this one {}",
            secret.len()
        ));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token is printable ASCII without spaces".into());
    }
    Ok(())
}

/// Checks a token name: 1 to [`TOKEN_NAME_BYTES_MAX`] bytes, no control characters.
pub fn validate_token_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > TOKEN_NAME_BYTES_MAX || name.chars().any(char::is_control) {
        return Err(format!(
            "a token name is 1 to {TOKEN_NAME_BYTES_MAX} bytes without control characters"
        ));
    }
    Ok(())
}

/// Checks a hash as a command carries it: 64 lowercase hex digits.
pub fn validate_hash(hash: &str) -> Result<(), String> {
    if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("a token hash is 64 lowercase hex digits".into());
    }
    Ok(())
}

/// Draws a new token secret: the prefix and 32 random bytes (hex) from the thread's
/// cryptographically secure generator (OS-seeded ChaCha).
pub fn new_token_secret() -> String {
    format!(
        "{}{}",
        TOKEN_SECRET_PREFIX,
        hex::encode(rand::random::<[u8; 32]>())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_secret_is_valid_and_never_repeats() {
        let (a, b) = (new_token_secret(), new_token_secret());
        assert!(a.starts_with(TOKEN_SECRET_PREFIX), "{a}");
        assert_eq!(validate_secret(&a), Ok(()));
        assert_ne!(a, b);
    }

    #[test]
    fn roles_are_ordered_and_parse() {
        assert!(Role::Admin.allows(Role::Deployer) && Role::Admin.allows(Role::Invoker));
        assert!(Role::Deployer.allows(Role::Invoker) && !Role::Deployer.allows(Role::Admin));
        assert!(!Role::Invoker.allows(Role::Deployer));
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn secrets_names_and_hashes_are_checked() {
        assert!(validate_secret(&"x".repeat(TOKEN_SECRET_BYTES_MIN)).is_ok());
        assert!(validate_secret(&"x".repeat(TOKEN_SECRET_BYTES_MIN - 1)).is_err());
        assert!(validate_secret(&"x".repeat(TOKEN_SECRET_BYTES_MAX + 1)).is_err());
        assert!(validate_secret(&format!("{} ", "x".repeat(40))).is_err());
        assert!(validate_token_name("ci").is_ok());
        assert!(validate_token_name("").is_err());
        assert!(validate_token_name("a\nb").is_err());
        assert!(validate_token_name(&"n".repeat(TOKEN_NAME_BYTES_MAX + 1)).is_err());
        assert!(validate_hash(&token_hash("s")).is_ok());
        assert!(validate_hash(&token_hash("s").to_uppercase()).is_err());
        assert!(validate_hash("abc").is_err());
    }
}
