//! The grant of one function: the key prefixes it may read and write, and the rule that a
//! listing never shows a key the function could not read.

use serde::{Deserialize, Serialize};

/// The keys one function may touch, as prefixes.
///
/// A key is readable if it starts with any read or write prefix, and writable if it starts
/// with a write prefix. A prefix may be listed only if it itself starts with a readable prefix,
/// so a listing never shows a key that could not be read. Empty lists allow nothing; the empty
/// string as a prefix allows every key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataAccess {
    pub read_prefixes: Vec<String>,
    pub write_prefixes: Vec<String>,
}

impl DataAccess {
    /// Whether `key` may be read.
    pub fn can_read(&self, key: &str) -> bool {
        self.read_prefixes
            .iter()
            .chain(&self.write_prefixes)
            .any(|p| key.starts_with(p.as_str()))
    }

    /// Whether `key` may be written or deleted.
    pub fn can_write(&self, key: &str) -> bool {
        self.write_prefixes
            .iter()
            .any(|p| key.starts_with(p.as_str()))
    }

    /// Whether the keys starting with `prefix` may be listed.
    pub fn can_list(&self, prefix: &str) -> bool {
        self.can_read(prefix)
    }

    /// What the grant allows, in words, for denial messages.
    pub(super) fn describe(&self) -> String {
        fn quoted(prefixes: &[&String]) -> String {
            let quoted: Vec<String> = prefixes.iter().map(|p| format!("{p:?}")).collect();
            quoted.join(", ")
        }
        let readable: Vec<&String> = self
            .read_prefixes
            .iter()
            .chain(&self.write_prefixes)
            .collect();
        let writable: Vec<&String> = self.write_prefixes.iter().collect();
        if readable.is_empty() {
            return "this function has no access to the store".to_string();
        }
        let writes = if writable.is_empty() {
            "write no key".to_string()
        } else {
            format!("write keys starting with {}", quoted(&writable))
        };
        format!(
            "this function may read keys starting with {} and {writes}",
            quoted(&readable)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(read: &[&str], write: &[&str]) -> DataAccess {
        DataAccess {
            read_prefixes: read.iter().map(|s| s.to_string()).collect(),
            write_prefixes: write.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn access_rules_follow_the_prefixes() {
        let a = access(&["public/"], &["fn/a/"]);
        assert!(a.can_read("public/x"));
        assert!(a.can_read("fn/a/x"), "a write prefix is readable too");
        assert!(!a.can_read("fn/b/x"));
        assert!(a.can_write("fn/a/x"));
        assert!(!a.can_write("public/x"));
        assert!(a.can_list("public/"));
        assert!(a.can_list("fn/a/sub"));
        assert!(!a.can_list("fn/"), "listing fn/ would show fn/b/");
        assert!(!a.can_list(""));
        let none = DataAccess::default();
        assert!(!none.can_read("x") && !none.can_write("x") && !none.can_list(""));
        assert!(access(&[""], &[]).can_list(""));
        assert_eq!(none.describe(), "this function has no access to the store");
        assert_eq!(
            a.describe(),
            r#"this function may read keys starting with "public/", "fn/a/" and write keys starting with "fn/a/""#
        );
    }
}
