//! Bounded reads of the files either side is handed: PEM material, manifests, code archives,
//! payloads and policies.
//!
//! Invariant: a file over its bound is refused, whether it was too large before the read or
//! grew during it; no more than the bound plus one byte is ever read.

use std::io::Read;
use std::path::Path;

/// Reads a whole file of at most `max` bytes, refusing a larger one before reading it.
pub fn read_bounded(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let too_large = |bytes: u64| {
        format!(
            "{what} {} is {bytes} bytes, the limit is {max}",
            path.display()
        )
    };
    let len = file
        .metadata()
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?
        .len();
    if len > max {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // The file may grow after the size check; reading one byte past the bound detects it.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}
