//! The replicated token table: every token record, looked up by id and by hash, and the
//! commands that create and revoke them. The types it holds are in [`crate::tokens`].
//!
//! Invariants:
//! - token ids start at 1 and only increase; a record is never deleted (a revoked token stays,
//!   flagged), so an id is never reused and the next id is the largest plus one;
//! - at most [`TOKENS_MAX`] records, revoked ones included; no two records share a hash;
//! - a bootstrap create succeeds only while the table is empty (or, for a retry, when its
//!   hash is already an active admin token's);
//! - like the rest of apply, a pure function of (table, command, time): the time is the
//!   entry's, the id the table's counter.

use std::collections::BTreeMap;

use bincode::Options as _;

use crate::model::CommandResult;
use crate::tokens::{
    token_hash, validate_hash, validate_token_name, Role, TokenId, TokenInfo, TokenRecord,
    TOKENS_MAX,
};

/// Tag byte of token objects in the state machine's object column family. Upper case, so it
/// cannot meet the scheduler's lower-case tags.
pub const OBJ_TOKEN: u8 = b'A';

fn codec() -> impl bincode::Options {
    bincode::DefaultOptions::new().with_fixint_encoding()
}

/// The replicated token table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    records: BTreeMap<TokenId, TokenRecord>,
    // Derived.
    by_hash: BTreeMap<String, TokenId>,
    /// Records changed by the command being applied; emptied by [`Tokens::take_changes`].
    dirty: Vec<TokenId>,
}

impl Tokens {
    /// Rebuilds the table from its persisted objects (keys tagged [`OBJ_TOKEN`]).
    pub fn from_objects(
        objects: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Result<Tokens, String> {
        let mut t = Tokens::default();
        for (key, value) in objects {
            let id = match key.split_first() {
                Some((&OBJ_TOKEN, rest)) => u64::from_be_bytes(
                    rest.try_into()
                        .map_err(|_| "token key is not a tag and 8 bytes")?,
                ),
                _ => return Err("not a token object".into()),
            };
            let record: TokenRecord = codec()
                .with_limit(value.len() as u64)
                .deserialize(&value)
                .map_err(|e| format!("token {id} does not decode: {e}"))?;
            if record.info.id != id || id == 0 {
                return Err(format!("token {} under key {id}", record.info.id));
            }
            validate_hash(&record.hash).map_err(|e| format!("token {id}: {e}"))?;
            if let Some(name) = &record.info.name {
                validate_token_name(name).map_err(|e| format!("token {id}: {e}"))?;
            }
            if record.info.revoked != record.info.revoked_ms.is_some() {
                return Err(format!("token {id}: revoked flag without its time"));
            }
            if t.by_hash.insert(record.hash.clone(), id).is_some() {
                return Err(format!("token {id} shares its hash with another"));
            }
            t.records.insert(id, record);
        }
        if t.records.len() > TOKENS_MAX {
            return Err(format!(
                "{} tokens, the limit is {TOKENS_MAX}",
                t.records.len()
            ));
        }
        Ok(t)
    }

    fn key(id: TokenId) -> Vec<u8> {
        let mut k = vec![OBJ_TOKEN];
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    fn value(record: &TokenRecord) -> Vec<u8> {
        codec()
            .serialize(record)
            .expect("a token record always serializes")
    }

    /// Every persisted object, in key order.
    pub fn objects(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.records
            .iter()
            .map(|(id, r)| (Tokens::key(*id), Tokens::value(r)))
            .collect()
    }

    /// The records changed since the last call, encoded (records are never deleted).
    pub fn take_changes(&mut self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        dirty
            .into_iter()
            .filter_map(|id| {
                self.records
                    .get(&id)
                    .map(|r| (Tokens::key(id), Some(Tokens::value(r))))
            })
            .collect()
    }

    /// Whether `key` names a token object.
    pub fn is_token_key(key: &[u8]) -> bool {
        key.first() == Some(&OBJ_TOKEN)
    }

    // ----- reads -------------------------------------------------------------------------

    /// The active (not revoked) token whose secret this is.
    pub fn authenticate(&self, secret: &str) -> Option<&TokenInfo> {
        let id = self.by_hash.get(&token_hash(secret))?;
        let info = &self.records.get(id)?.info;
        (!info.revoked).then_some(info)
    }

    /// The token with this hash, revoked or not.
    pub fn by_hash(&self, hash: &str) -> Option<&TokenInfo> {
        let id = self.by_hash.get(hash)?;
        self.records.get(id).map(|r| &r.info)
    }

    pub fn get(&self, id: TokenId) -> Option<&TokenInfo> {
        self.records.get(&id).map(|r| &r.info)
    }

    /// Every token in id order, revoked ones included.
    pub fn list(&self) -> impl Iterator<Item = &TokenInfo> {
        self.records.values().map(|r| &r.info)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    // ----- apply -------------------------------------------------------------------------

    /// Creates a token. A `bootstrap` create is refused once any token exists, except that
    /// a retry (its hash already an active admin token's) answers with that token.
    pub fn create(
        &mut self,
        now: u64,
        role: Role,
        name: Option<&str>,
        hash: &str,
        bootstrap: bool,
    ) -> CommandResult {
        if let Some(existing) = self.by_hash(hash) {
            if bootstrap && existing.role == Role::Admin && !existing.revoked {
                return CommandResult::TokenCreated {
                    token: existing.clone(),
                };
            }
            return rejected("a token with this secret already exists".into());
        }
        if bootstrap && !self.records.is_empty() {
            return rejected(
                "the cluster already has tokens: a bootstrap token is made only on a cluster without any"
                    .into(),
            );
        }
        if self.records.len() >= TOKENS_MAX {
            return rejected(format!(
                "the cluster holds {TOKENS_MAX} tokens (revoked ones included), its limit"
            ));
        }
        let id = self.records.keys().next_back().map_or(1, |last| last + 1);
        let info = TokenInfo {
            id,
            name: name.map(str::to_string),
            role,
            created_ms: now,
            revoked: false,
            revoked_ms: None,
        };
        self.by_hash.insert(hash.to_string(), id);
        self.records.insert(
            id,
            TokenRecord {
                info: info.clone(),
                hash: hash.to_string(),
            },
        );
        self.dirty.push(id);
        CommandResult::TokenCreated { token: info }
    }

    /// Revokes a token; revoking a revoked token changes nothing and answers the same.
    pub fn revoke(&mut self, now: u64, id: TokenId) -> CommandResult {
        let Some(record) = self.records.get_mut(&id) else {
            return CommandResult::NotFound;
        };
        if !record.info.revoked {
            record.info.revoked = true;
            record.info.revoked_ms = Some(now);
            self.dirty.push(id);
        }
        CommandResult::TokenRevoked {
            token: record.info.clone(),
        }
    }
}

fn rejected(reason: String) -> CommandResult {
    CommandResult::Rejected { reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(r: CommandResult) -> TokenInfo {
        match r {
            CommandResult::TokenCreated { token } => token,
            other => panic!("expected a created token, got {other:?}"),
        }
    }

    fn reload(t: &Tokens) -> Tokens {
        Tokens::from_objects(t.objects()).expect("valid objects")
    }

    #[test]
    fn bootstrap_only_on_an_empty_table_and_retries_answer_the_same() {
        let mut t = Tokens::default();
        let first = created(t.create(5, Role::Admin, Some("bootstrap"), &token_hash("a"), true));
        assert_eq!(
            (first.id, first.created_ms, first.role),
            (1, 5, Role::Admin)
        );
        // The same bootstrap again (a retried init): the same token, nothing new.
        let again = created(t.create(6, Role::Admin, Some("bootstrap"), &token_hash("a"), true));
        assert_eq!(again, first);
        assert_eq!(t.len(), 1);
        // Another bootstrap is refused.
        let r = t.create(7, Role::Admin, None, &token_hash("b"), true);
        assert!(matches!(r, CommandResult::Rejected { .. }), "{r:?}");
        assert_eq!(t.len(), 1);
        // After revocation a retry of the old bootstrap is refused too.
        t.revoke(8, 1);
        let r = t.create(9, Role::Admin, None, &token_hash("a"), true);
        assert!(matches!(r, CommandResult::Rejected { .. }), "{r:?}");
    }

    #[test]
    fn create_revoke_and_authenticate() {
        let mut t = Tokens::default();
        created(t.create(1, Role::Admin, None, &token_hash("admin-secret"), true));
        let d = created(t.create(
            2,
            Role::Deployer,
            Some("ci"),
            &token_hash("ci-secret"),
            false,
        ));
        assert_eq!((d.id, d.name.as_deref()), (2, Some("ci")));
        assert_eq!(
            t.authenticate("ci-secret").map(|i| i.role),
            Some(Role::Deployer)
        );
        assert!(t.authenticate("other").is_none());
        // A duplicate hash is refused.
        let r = t.create(3, Role::Invoker, None, &token_hash("ci-secret"), false);
        assert!(matches!(r, CommandResult::Rejected { .. }), "{r:?}");

        let r = t.revoke(4, 2);
        let CommandResult::TokenRevoked { token } = r else {
            panic!("expected a revocation, got {r:?}");
        };
        assert!(token.revoked && token.revoked_ms == Some(4));
        assert!(t.authenticate("ci-secret").is_none());
        // Idempotent, and the first revocation time stays.
        assert_eq!(
            t.revoke(5, 2),
            CommandResult::TokenRevoked {
                token: token.clone()
            }
        );
        assert_eq!(t.revoke(5, 99), CommandResult::NotFound);
        // Ids are never reused: the next token is 3 although 2 is revoked.
        let n = created(t.create(6, Role::Invoker, None, &token_hash("n"), false));
        assert_eq!(n.id, 3);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = Tokens::default();
        for i in 0..TOKENS_MAX {
            created(t.create(1, Role::Invoker, None, &token_hash(&i.to_string()), false));
        }
        let r = t.create(1, Role::Invoker, None, &token_hash("one more"), false);
        assert!(matches!(r, CommandResult::Rejected { .. }), "{r:?}");
        assert_eq!(t.len(), TOKENS_MAX);
    }

    #[test]
    fn changes_and_objects_rebuild_the_same_table() {
        let mut t = Tokens::default();
        let mut persisted = BTreeMap::new();
        created(t.create(1, Role::Admin, None, &token_hash("a"), true));
        created(t.create(2, Role::Invoker, Some("x"), &token_hash("b"), false));
        for (k, v) in t.take_changes() {
            persisted.insert(k, v.expect("tokens are never deleted"));
        }
        t.revoke(3, 2);
        let changes = t.take_changes();
        assert_eq!(changes.len(), 1, "only the revoked record is written");
        for (k, v) in changes {
            persisted.insert(k, v.expect("tokens are never deleted"));
        }
        assert!(t.take_changes().is_empty());
        let rebuilt = Tokens::from_objects(persisted).expect("valid");
        assert_eq!(rebuilt, t);
        assert_eq!(reload(&t), t);
        assert!(rebuilt.authenticate("b").is_none());
        assert!(rebuilt.authenticate("a").is_some());
    }

    #[test]
    fn broken_objects_are_refused() {
        let mut t = Tokens::default();
        created(t.create(1, Role::Admin, None, &token_hash("a"), true));
        let (key, value) = t.objects().remove(0);
        let mut wrong_key = key.clone();
        *wrong_key.last_mut().expect("key") = 9;
        assert!(Tokens::from_objects([(wrong_key, value.clone())]).is_err());
        assert!(Tokens::from_objects([(key.clone(), vec![1, 2, 3])]).is_err());
        assert!(Tokens::from_objects([(b"Ax".to_vec(), value.clone())]).is_err());
        // Two records with one hash.
        let mut other = t.clone();
        other.records.get_mut(&1).expect("1").info.id = 2;
        let dup = other.records[&1].clone();
        let dup_value = Tokens::value(&dup);
        assert!(Tokens::from_objects([(key, value), (Tokens::key(2), dup_value)]).is_err());
    }
}
