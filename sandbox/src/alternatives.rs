//! Debian's alternatives inside a sandbox: `/usr/bin/awk` is a link to `/etc/alternatives/awk`,
//! itself a link to `/usr/bin/mawk`, and the sandbox's `/etc` is its own, so without this every
//! such command is "not found".
//!
//! A sandbox gets, bound read-only at `/etc/alternatives`, a directory of links made by the
//! node: one for each host alternative whose real target lies within a path the sandbox has
//! bound, pointing straight at that real target. An alternative that resolves anywhere else is
//! left out, never linked. The directories ("views") are made once per set of bound paths and
//! reused: a start costs one `stat` of `/etc/alternatives` and a map look-up.
//!
//! Invariants: a view holds only links to real paths within the bound paths it was made for;
//! at most [`VIEWS_MAX`] views exist per node process (past that, sandboxes with a new set of
//! bound paths go without alternatives, as before); a view is never changed once made (a
//! change of the host's alternatives, seen by the directory's modification time, makes new
//! ones).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

/// The host's alternatives, and where the view appears inside a sandbox.
pub(crate) const ALTERNATIVES_DIR: &str = "/etc/alternatives";
/// Where the views are made, one directory per view named after the node process and the
/// view's contents.
const VIEWS_DIR: &str = "/run/skiff-sandbox/alternatives";
/// Most views one node process makes (each a directory of a few hundred links; a policy that
/// narrows the readable paths makes its own).
pub(crate) const VIEWS_MAX: usize = 64;
/// Most alternatives read from the host (Debian systems have a few hundred).
const LINKS_MAX: usize = 4096;

#[derive(Default)]
struct Cache {
    /// Modification time of the host's directory when `links` was read.
    read_at: Option<SystemTime>,
    /// Name and real target of every host alternative that resolves.
    links: Vec<(OsString, PathBuf)>,
    /// The view made for each set of bound paths (`None`: nothing to link), for `read_at`.
    views: HashMap<Vec<PathBuf>, Option<PathBuf>>,
    /// Views made by this process, whatever `read_at`: the bound on directories.
    made: usize,
    /// Whether views of dead node processes were removed.
    swept: bool,
    /// Whether reaching [`VIEWS_MAX`] was logged.
    warned: bool,
}

/// The view for a sandbox that binds `bound` (real paths), made on first use; `None` when the
/// host has no alternatives, none resolves within `bound`, or the views are at their bound.
pub(crate) fn view(bound: &[PathBuf]) -> Option<PathBuf> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let modified = fs::metadata(ALTERNATIVES_DIR)
        .and_then(|m| m.modified())
        .ok()?;
    let mut cache = CACHE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if cache.read_at != Some(modified) {
        cache.links = read_links(Path::new(ALTERNATIVES_DIR));
        cache.views.clear();
        cache.read_at = Some(modified);
    }
    if let Some(view) = cache.views.get(bound) {
        return view.clone();
    }
    let kept = links_within(&cache.links, bound);
    let view = if kept.is_empty() {
        None
    } else if cache.made >= VIEWS_MAX {
        if !cache.warned {
            cache.warned = true;
            tracing::warn!(
                views = VIEWS_MAX,
                "too many alternatives views; sandboxes with other readable paths go without \
                 /etc/alternatives"
            );
        }
        return None;
    } else {
        if !cache.swept {
            cache.swept = true;
            sweep_dead(Path::new(VIEWS_DIR));
        }
        match make_view(Path::new(VIEWS_DIR), &kept) {
            Ok(path) => {
                cache.made += 1;
                Some(path)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot make the alternatives view");
                return None;
            }
        }
    };
    cache.views.insert(bound.to_vec(), view.clone());
    view
}

/// Every alternative in `dir` that resolves, with its real target (at most [`LINKS_MAX`]).
fn read_links(dir: &Path) -> Vec<(OsString, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut links: Vec<(OsString, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_symlink()))
        .take(LINKS_MAX)
        .filter_map(|e| Some((e.file_name(), fs::canonicalize(e.path()).ok()?)))
        .collect();
    links.sort();
    links
}

/// The links whose real target is within one of `bound`.
fn links_within(links: &[(OsString, PathBuf)], bound: &[PathBuf]) -> Vec<(OsString, PathBuf)> {
    links
        .iter()
        .filter(|(_, target)| bound.iter().any(|b| target.starts_with(b)))
        .cloned()
        .collect()
}

/// Makes a view holding `links` under `views_dir`, named after this process and the links:
/// filled under a temporary name, then renamed into place, so a sandbox never binds a
/// half-made view.
fn make_view(views_dir: &Path, links: &[(OsString, PathBuf)]) -> io::Result<PathBuf> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    links.hash(&mut hasher);
    let name = format!("{}-{:016x}", std::process::id(), hasher.finish());
    let path = views_dir.join(&name);
    if path.is_dir() {
        return Ok(path);
    }
    fs::create_dir_all(views_dir)?;
    fs::set_permissions(views_dir, fs::Permissions::from_mode(0o755))?;
    let partial = views_dir.join(format!("{name}.partial"));
    match fs::remove_dir_all(&partial) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::create_dir(&partial)?;
    for (link, target) in links {
        std::os::unix::fs::symlink(target, partial.join(link))?;
    }
    fs::set_permissions(&partial, fs::Permissions::from_mode(0o755))?;
    fs::rename(&partial, &path)?;
    Ok(path)
}

/// Removes the views of node processes that are gone (named `<pid>-...`).
fn sweep_dead(views_dir: &Path) {
    let Ok(entries) = fs::read_dir(views_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.split('-').next()?.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_alternatives_resolving_within_the_bound_paths_are_linked() {
        let host = tempfile::tempdir().expect("tempdir");
        let usr = host.path().join("usr/bin");
        let secret = host.path().join("secret");
        fs::create_dir_all(&usr).expect("mkdir");
        fs::create_dir_all(&secret).expect("mkdir");
        fs::write(usr.join("mawk"), "").expect("write");
        fs::write(secret.join("key"), "").expect("write");
        let alternatives = host.path().join("alternatives");
        fs::create_dir(&alternatives).expect("mkdir");
        let link = |name: &str, target: &Path| {
            std::os::unix::fs::symlink(target, alternatives.join(name)).expect("symlink")
        };
        link("awk", &usr.join("mawk"));
        link("key", &secret.join("key"));
        // Through a link that itself points outside, then back in: the real target decides.
        link("relative", Path::new("../usr/bin/mawk"));
        link("dangling", &usr.join("missing"));
        fs::write(alternatives.join("README"), "").expect("write");

        let links = read_links(&alternatives);
        let names: Vec<_> = links
            .iter()
            .map(|(n, _)| n.to_str().expect("utf-8"))
            .collect();
        assert_eq!(names, ["awk", "key", "relative"]);
        let real_usr = fs::canonicalize(host.path().join("usr")).expect("real");
        let kept = links_within(&links, std::slice::from_ref(&real_usr));
        let names: Vec<_> = kept
            .iter()
            .map(|(n, _)| n.to_str().expect("utf-8"))
            .collect();
        assert_eq!(names, ["awk", "relative"]);
        assert!(kept.iter().all(|(_, t)| t.starts_with(&real_usr)));
        assert!(links_within(&links, &[real_usr.join("lib")]).is_empty());

        let views = host.path().join("views");
        let view = make_view(&views, &kept).expect("view made");
        let mut made: Vec<_> = fs::read_dir(&view)
            .expect("view")
            .flatten()
            .map(|e| (e.file_name(), fs::read_link(e.path()).expect("a link")))
            .collect();
        made.sort();
        assert_eq!(made, kept);
        assert_eq!(
            fs::metadata(&view).expect("stat").permissions().mode() & 0o777,
            0o755
        );
        // The same links, the same view.
        assert_eq!(make_view(&views, &kept).expect("view"), view);
    }
}
