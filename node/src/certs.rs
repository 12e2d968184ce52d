//! `skiffd certs`: the cluster's certificate authority and one certificate per node.
//!
//! The CA is made once per cluster (`ca.pem`, `ca.key`) and signs nothing but node
//! certificates; nodes trust only it (see `skiff_client::tls`). Each node gets `node-ID.pem`
//! and `node-ID.key`, naming the hosts (addresses or DNS names) it is dialed at, usable both to
//! serve and to dial peers. Running the command again with an existing CA adds or renews node
//! certificates under the same CA, so a node can join later.
//!
//! Keys are ECDSA P-256; private keys are written mode 0600, through a temporary file renamed
//! into place, and existing node files are only replaced when asked.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use skiff_client::api::NodeId;

/// Years a certificate made here is valid.
pub const VALID_YEARS: i32 = 10;

/// Most hosts named in one node certificate.
pub const HOSTS_PER_NODE_MAX: usize = 32;

/// What went wrong making certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

/// One node to make a certificate for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCert {
    pub id: NodeId,
    /// Host names and addresses the node is dialed at.
    pub hosts: Vec<String>,
}

/// Parses `ID=HOST[,HOST...]`, as `--node` takes it.
pub fn parse_node(s: &str) -> Result<NodeCert, String> {
    let (id, hosts) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ID=HOST[,HOST...]"))?;
    let id: NodeId = id
        .trim()
        .parse()
        .ok()
        .filter(|&id| id != 0)
        .ok_or_else(|| format!("{id:?} is not a node id (a positive integer)"))?;
    let hosts: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(String::from)
        .collect();
    if hosts.is_empty() {
        return Err(format!("node {id} has no host"));
    }
    if hosts.len() > HOSTS_PER_NODE_MAX {
        return Err(format!(
            "node {id} names {} hosts; the limit is {HOSTS_PER_NODE_MAX}",
            hosts.len()
        ));
    }
    for h in &hosts {
        let dns = h.len() <= 253
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !dns && h.parse::<std::net::IpAddr>().is_err() {
            return Err(format!("{h:?} is not a host name or address"));
        }
    }
    Ok(NodeCert { id, hosts })
}

/// The files of one node's TLS settings in `dir`.
pub fn node_files(dir: &Path, id: NodeId) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("ca.pem"),
        dir.join(format!("node-{id}.pem")),
        dir.join(format!("node-{id}.key")),
    )
}

/// The `skiffd` flags that give node `id` its files in `dir`.
pub fn node_flags(dir: &Path, id: NodeId) -> Vec<std::ffi::OsString> {
    let (ca, cert, key) = node_files(dir, id);
    vec![
        "--tls-ca".into(),
        ca.into(),
        "--tls-cert".into(),
        cert.into(),
        "--tls-key".into(),
        key.into(),
    ]
}

/// What [`generate`] wrote.
#[derive(Debug, Default)]
pub struct Generated {
    /// Whether a new CA was made (otherwise the one in the directory signed).
    pub new_ca: bool,
    pub written: Vec<PathBuf>,
}

/// Makes (or reuses) the CA in `dir` and a certificate for each of `nodes`. An existing node
/// certificate is an error unless `replace`.
pub fn generate(dir: &Path, nodes: &[NodeCert], replace: bool) -> Result<Generated, CertError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut out = Generated::default();
    let ca_cert = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let (ca_params, ca_key) = match (ca_cert.exists(), ca_key_path.exists()) {
        (true, true) => {
            let pem = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
            let key = KeyPair::from_pem(&pem).map_err(|e| {
                CertError::Invalid(format!("{}: not a CA key: {e}", ca_key_path.display()))
            })?;
            (ca_params(), key)
        }
        (false, false) => {
            let key = KeyPair::generate()?;
            let params = ca_params();
            let cert = params.self_signed(&key)?;
            write_file(&ca_key_path, key.serialize_pem().as_bytes(), true)?;
            write_file(&ca_cert, cert.pem().as_bytes(), false)?;
            out.new_ca = true;
            out.written.extend([ca_cert.clone(), ca_key_path.clone()]);
            (params, key)
        }
        _ => {
            return Err(CertError::Invalid(format!(
            "{} holds only one of ca.pem and ca.key: restore the other or use an empty directory",
            dir.display()
        )))
        }
    };
    let issuer = Issuer::new(ca_params, ca_key);
    for node in nodes {
        let (_, cert_path, key_path) = node_files(dir, node.id);
        if !replace && (cert_path.exists() || key_path.exists()) {
            return Err(CertError::Invalid(format!(
                "{} already exists (pass --replace to renew it)",
                cert_path.display()
            )));
        }
        let mut params = CertificateParams::new(node.hosts.clone())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("skiff node {}", node.id));
        params.distinguished_name = dn;
        params.serial_number = Some(serial());
        set_validity(&mut params);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
        write_file(&cert_path, cert.pem().as_bytes(), false)?;
        out.written.extend([cert_path, key_path]);
    }
    Ok(out)
}

/// The CA's parameters. The name is fixed, so a CA read back from its key signs certificates
/// that chain to the `ca.pem` written when it was made (the issuer name comes from here, the
/// key identifier from the key; the serial and validity need not match).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "skiff cluster CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(serial());
    set_validity(&mut params);
    params
}

fn serial() -> SerialNumber {
    // Positive 63-bit serials: unique enough per CA, and no sign-bit surprises in DER.
    SerialNumber::from((rand::random::<u64>() >> 1).max(1))
}

/// Valid from the start of last year (clock skew between machines) for [`VALID_YEARS`].
fn set_validity(params: &mut CertificateParams) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // A mean Gregorian year is 31,556,952 s; the year can only be off near New Year's Day,
    // which the year of slack on each side absorbs.
    let year = 1970 + i32::try_from(secs / 31_556_952).unwrap_or(0);
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + VALID_YEARS, 1, 1);
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    // A new file, never one left there (whose mode would be kept) or a link (followed).
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_specs_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_node("2=10.0.0.2, node2.example").expect("valid"),
            NodeCert {
                id: 2,
                hosts: vec!["10.0.0.2".into(), "node2.example".into()]
            }
        );
        assert_eq!(parse_node("1=::1").expect("ipv6").hosts, vec!["::1"]);
        for bad in ["", "1", "0=h", "x=h", "1=", "1=a b", "1=h/x", "1=a:b"] {
            assert!(parse_node(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn a_reused_ca_signs_certificates_that_chain_to_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = [parse_node("1=127.0.0.1,localhost").expect("node")];
        let made = generate(dir.path(), &one, false).expect("generate");
        assert!(made.new_ca);
        assert!(
            generate(dir.path(), &one, false).is_err(),
            "no silent overwrite"
        );
        let two = [parse_node("2=127.0.0.1").expect("node")];
        let later = generate(dir.path(), &two, false).expect("add a node");
        assert!(!later.new_ca);
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
        };
        assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
        assert_eq!(mode(&dir.path().join("node-2.key")), 0o600);
        // Both certificates verify against the one CA file (rustls's own verifier).
        for id in [1, 2] {
            let (ca, cert, key) = node_files(dir.path(), id);
            skiff_client::tls::TlsAcceptor::node(&ca, &cert, &key).expect("acceptor");
            skiff_client::tls::TlsConnector::node(&ca, &cert, &key).expect("connector");
        }
        std::fs::remove_file(dir.path().join("ca.key")).expect("rm");
        assert!(
            generate(dir.path(), &two, true).is_err(),
            "half a CA is refused"
        );
    }
}
