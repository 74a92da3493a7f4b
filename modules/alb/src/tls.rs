//! TLS for the ALB, on rustls with the ring provider.
//!
//! Downstream (clients to the ALB): a [`CertStore`] holds every configured
//! certificate behind one atomic pointer and picks one per handshake by SNI;
//! [`server_config`] wraps it with ALPN `h2` then `http/1.1`. A reload (an
//! explicit [`CertStore::reload`], or [`spawn_reloader`] polling the files)
//! swaps the whole set at once: new handshakes see the new certificates,
//! connections already up keep theirs, and a failed reload changes nothing.
//! [`sniff_tls`] tells a TLS ClientHello from plaintext HTTP on a port that
//! serves both.
//!
//! Which names a certificate serves: the DNS names in its subjectAltName
//! extension, or, when it has no SAN DNS name, its subject common name (CN).
//! Names that are not valid DNS names (a CN such as `Acme Default`) are
//! ignored. A wildcard `*.example.com` matches exactly one label, as browsers
//! do (RFC 6125 section 6.4.3): `a.example.com`, but neither `example.com`
//! nor `a.b.example.com`; only a whole leftmost `*` label is a wildcard
//! (`f*.example.com` is ignored), and it needs at least two labels after it
//! (`*.com` is ignored). For an SNI name (case-insensitive, a trailing dot
//! ignored) the choice is: a certificate naming it exactly, else one whose
//! wildcard matches, else the first certificate (the default, also served to
//! clients that send no SNI). When two certificates claim the same name the
//! earlier one in the list wins, with a warning at load.
//!
//! Upstream (the ALB to origins): [`upstream_client_config`] verifies origins
//! against the CA roots in `ca_file`, which is required: there is no
//! built-in root store and no switch that turns verification off. An origin
//! with a self-signed certificate is trusted by naming that certificate as
//! its `ca_file`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::client::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::RootCertStore;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The ALPN name of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// The ALPN name of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why TLS could not be set up. Every message starts with the config field
/// (`tls.certificates[1].key_file`, `upstream_tls.ca_file`) and, for a file,
/// its path; callers with a longer config path prefix their own context.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A configured file could not be read.
    #[error("{field} {}: cannot read the file: {source}", path.display())]
    Read {
        field: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file was read but does not hold what its field needs.
    #[error("{field} {}: {problem}", path.display())]
    BadFile {
        field: String,
        path: PathBuf,
        problem: String,
    },
    /// A certificate and a key that do not belong together.
    #[error(
        "{field}: the certificate in {} and the key in {} do not make a usable pair: {problem}",
        cert_file.display(),
        key_file.display()
    )]
    Pair {
        field: String,
        cert_file: PathBuf,
        key_file: PathBuf,
        problem: String,
    },
    /// A setting that is missing, contradictory or out of range.
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---------------------------------------------------------------------------
// Downstream: configuration

/// One certificate the ALB serves: a PEM chain (leaf first, then any
/// intermediates) and its PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC,
/// unencrypted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertSpec {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// TLS termination for the ALB's clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsSpec {
    /// Every certificate served. The first is the default: for clients
    /// without SNI or with a name no certificate serves.
    pub certificates: Vec<CertSpec>,
    /// How often to check the files for changes; 0 = only on an explicit
    /// reload.
    #[serde(default = "default_reload_interval_seconds")]
    pub reload_interval_seconds: u64,
}

fn default_reload_interval_seconds() -> u64 {
    10
}

impl ServerTlsSpec {
    /// The polling interval; zero means no polling.
    pub fn reload_interval(&self) -> Duration {
        Duration::from_secs(self.reload_interval_seconds)
    }
}

// ---------------------------------------------------------------------------
// Downstream: the certificate store

/// A file's version as seen by `stat`: modification time, length and inode.
/// A rewrite that keeps all three (same length within the clock's
/// granularity) goes unnoticed until an explicit reload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp(Option<(SystemTime, u64, u64)>);

impl FileStamp {
    fn of(path: &Path) -> FileStamp {
        FileStamp(std::fs::metadata(path).ok().map(|m| {
            #[cfg(unix)]
            let inode = std::os::unix::fs::MetadataExt::ino(&m);
            #[cfg(not(unix))]
            let inode = 0;
            (
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
                inode,
            )
        }))
    }
}

fn stamps(certs: &[CertSpec]) -> Vec<FileStamp> {
    certs
        .iter()
        .flat_map(|c| [FileStamp::of(&c.cert_file), FileStamp::of(&c.key_file)])
        .collect()
}

/// One loaded set of certificates: what a handshake reads.
struct CertSet {
    certs: Vec<Arc<CertifiedKey>>,
    /// The names each certificate serves, in spec order (wildcards as
    /// `*.parent`).
    names: Vec<Vec<String>>,
    exact: HashMap<String, usize>,
    /// Keyed by the parent of the wildcard: `example.com` for `*.example.com`.
    wildcard: HashMap<String, usize>,
}

impl CertSet {
    fn pick(&self, sni: Option<&str>) -> usize {
        let Some(sni) = sni else { return 0 };
        let name = sni.strip_suffix('.').unwrap_or(sni).to_ascii_lowercase();
        if let Some(&i) = self.exact.get(&name) {
            return i;
        }
        match name.split_once('.') {
            Some((label, parent)) if !label.is_empty() => {
                self.wildcard.get(parent).copied().unwrap_or(0)
            }
            _ => 0,
        }
    }
}

/// What the store was loaded from.
struct Source {
    certs: Vec<CertSpec>,
    stamps: Vec<FileStamp>,
}

/// The ALB's server certificates, chosen by SNI, swapped atomically on
/// reload. Handshakes read it with one atomic load and never wait for a
/// reload.
pub struct CertStore {
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertSet>,
    /// Also serializes reloads.
    source: Mutex<Source>,
}

impl CertStore {
    /// Loads every certificate of `spec`.
    pub fn load(spec: &ServerTlsSpec) -> Result<CertStore, TlsError> {
        let provider = provider();
        let stamps = stamps(&spec.certificates);
        let set = load_set(&spec.certificates, &provider)?;
        Ok(CertStore {
            provider,
            current: ArcSwap::from_pointee(set),
            source: Mutex::new(Source {
                certs: spec.certificates.clone(),
                stamps,
            }),
        })
    }

    /// Re-reads every file of `spec` (whose list may differ from the one in
    /// force) and swaps the new set in. On any error the certificates in
    /// force stay and the error names the field and the file. Returns how
    /// many certificates are now served.
    pub fn reload(&self, spec: &ServerTlsSpec) -> Result<usize, TlsError> {
        let mut source = self.source.lock();
        self.reload_locked(&mut source, &spec.certificates)
    }

    /// Whether any certificate or key file changed (or appeared, or
    /// vanished) since the certificates in force were loaded. Stays true
    /// after a failed reload, so a poller tries again.
    pub fn files_changed(&self) -> bool {
        let source = self.source.lock();
        stamps(&source.certs) != source.stamps
    }

    /// Reloads the certificate list in force if its files changed: `None`
    /// when nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<usize, TlsError>> {
        let mut source = self.source.lock();
        if stamps(&source.certs) == source.stamps {
            return None;
        }
        let certs = source.certs.clone();
        Some(self.reload_locked(&mut source, &certs))
    }

    fn reload_locked(&self, source: &mut Source, certs: &[CertSpec]) -> Result<usize, TlsError> {
        // Stamp before reading: a write that lands while we read shows up
        // as a change at the next poll.
        let stamps = stamps(certs);
        let set = load_set(certs, &self.provider)?;
        let served = set.certs.len();
        self.current.store(Arc::new(set));
        *source = Source {
            certs: certs.to_vec(),
            stamps,
        };
        Ok(served)
    }

    /// The certificate for a client that sent `sni` (or no SNI).
    pub fn resolve_name(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let set = self.current.load();
        set.certs[set.pick(sni)].clone()
    }

    /// The names each certificate claims, in spec order; wildcards as
    /// `*.parent`, all lowercase. A name claimed twice is served by the
    /// first certificate claiming it.
    pub fn names(&self) -> Vec<Vec<String>> {
        self.current.load().names.clone()
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("names", &self.current.load().names)
            .finish()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.resolve_name(client_hello.server_name()))
    }
}

/// Polls the store's files every `every` and reloads when they change,
/// calling `on_result` with each reload's outcome (for metrics; the reload
/// is also logged here). Stops when `shutdown` turns true or its sender is
/// dropped. With `every` zero the task ends at once: reloads are then
/// explicit only. The files polled are those of the list in force, so an
/// explicit [`CertStore::reload`] with a new list redirects the poller.
pub fn spawn_reloader<F>(
    store: Arc<CertStore>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut on_result: F,
) -> JoinHandle<()>
where
    F: FnMut(Result<usize, TlsError>) + Send + 'static,
{
    tokio::spawn(async move {
        if every.is_zero() {
            return;
        }
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate, and the store was just loaded.
        ticks.tick().await;
        loop {
            if *shutdown.borrow_and_update() {
                return;
            }
            tokio::select! {
                _ = ticks.tick() => {}
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
            let polled = store.clone();
            let outcome =
                match tokio::task::spawn_blocking(move || polled.reload_if_changed()).await {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        tracing::error!(error = %e, "TLS certificate reload task failed");
                        continue;
                    }
                };
            let Some(result) = outcome else { continue };
            match &result {
                Ok(served) => {
                    tracing::info!(certificates = served, names = ?store.names(), "TLS certificates reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificates changed on disk but cannot be loaded; the ones in force stay");
                }
            }
            on_result(result);
        }
    })
}

/// The ALB's server config: certificates from `store` by SNI, ALPN `h2`
/// then `http/1.1` (the server's order decides), no client certificates.
pub fn server_config(store: Arc<CertStore>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(store.provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Arc::new(config)
}

fn load_set(certs: &[CertSpec], provider: &CryptoProvider) -> Result<CertSet, TlsError> {
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            field: "tls.certificates".into(),
            problem: "at least one certificate is required (the first is the default)".into(),
        });
    }
    let mut set = CertSet {
        certs: Vec::with_capacity(certs.len()),
        names: Vec::with_capacity(certs.len()),
        exact: HashMap::new(),
        wildcard: HashMap::new(),
    };
    for (i, spec) in certs.iter().enumerate() {
        let field = format!("tls.certificates[{i}]");
        let key = load_certified_key(&field, &spec.cert_file, &spec.key_file, provider)?;
        let leaf = key.cert.first().map(|c| c.as_ref()).unwrap_or_default();
        let raw = cert_names(leaf).map_err(|problem| TlsError::BadFile {
            field: format!("{field}.cert_file"),
            path: spec.cert_file.clone(),
            problem: format!("cannot read the names of the first certificate: {problem}"),
        })?;
        let mut served = Vec::new();
        for name in raw {
            let (map, key_name, shown) = match served_name(&name) {
                Some(ServedName::Exact(n)) => (&mut set.exact, n.clone(), n),
                Some(ServedName::Wildcard(parent)) => {
                    let shown = format!("*.{parent}");
                    (&mut set.wildcard, parent, shown)
                }
                None => {
                    tracing::warn!(certificate = %field, name = %name, "certificate name is not a DNS name or a one-label wildcard; ignored");
                    continue;
                }
            };
            match map.get(&key_name) {
                Some(&first) if first != i => tracing::warn!(
                    certificate = %field,
                    name = %shown,
                    "name also served by tls.certificates[{first}], which wins"
                ),
                Some(_) => {}
                None => {
                    map.insert(key_name, i);
                }
            }
            if !served.contains(&shown) {
                served.push(shown);
            }
        }
        if served.is_empty() && i > 0 {
            tracing::warn!(certificate = %field, "certificate serves no DNS name and is not the first (default): no client will be given it");
        }
        set.certs.push(Arc::new(key));
        set.names.push(served);
    }
    Ok(set)
}

enum ServedName {
    Exact(String),
    /// The parent domain of `*.parent`.
    Wildcard(String),
}

fn served_name(raw: &str) -> Option<ServedName> {
    let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
    match name.strip_prefix("*.") {
        Some(parent) => (parent.contains('.') && DnsName::try_from(parent).is_ok())
            .then(|| ServedName::Wildcard(parent.to_string())),
        None => DnsName::try_from(name.as_str())
            .is_ok()
            .then_some(ServedName::Exact(name)),
    }
}

// ---------------------------------------------------------------------------
// Files

fn read_file(field: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field: field.to_string(),
        path: path.to_path_buf(),
        source,
    })
}

fn bad_file(field: &str, path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::BadFile {
        field: field.to_string(),
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Every PEM certificate in the file, in order; at least one.
fn read_certs(field: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_file(field, path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad_file(field, path, "no PEM certificate found"));
    }
    Ok(certs)
}

fn read_key(field: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(field, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => bad_file(
            field,
            path,
            "no private key found (expected an unencrypted PEM key: PKCS#8, PKCS#1 RSA or SEC1 EC)",
        ),
        e => bad_file(field, path, format!("not valid PEM: {e}")),
    })
}

/// Loads a chain and its key and checks that they belong together.
/// `field` is the spec holding `cert_file` and `key_file`.
fn load_certified_key(
    field: &str,
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_field = format!("{field}.cert_file");
    let key_field = format!("{field}.key_file");
    let chain = read_certs(&cert_field, cert_file)?;
    let key = read_key(&key_field, key_file)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad_file(&key_field, key_file, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(e) => Err(TlsError::Pair {
            field: field.to_string(),
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            problem: e.to_string(),
        }),
    }
}

// ---------------------------------------------------------------------------
// Names in an X.509 certificate (RFC 5280), read with a minimal DER walker:
// enough to find the subjectAltName DNS names and the subject CN, without
// a certificate-parsing dependency. It reads operator files, not the wire,
// and it never panics: every read is bounds-checked.

const DER_INTEGER: u8 = 0x02;
const DER_OCTET_STRING: u8 = 0x04;
const DER_OID: u8 = 0x06;
const DER_BOOLEAN: u8 = 0x01;
const DER_SEQUENCE: u8 = 0x30;
const DER_SET: u8 = 0x31;
/// `[0]` EXPLICIT: the TBSCertificate version.
const DER_VERSION: u8 = 0xa0;
/// `[3]` EXPLICIT: the TBSCertificate extensions.
const DER_EXTENSIONS: u8 = 0xa3;
/// `[2]` IMPLICIT IA5String: a GeneralName dNSName.
const DER_DNS_NAME: u8 = 0x82;
/// 2.5.29.17, subjectAltName.
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
/// 2.5.4.3, commonName.
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];

type Der<'a> = Result<(u8, &'a [u8], &'a [u8]), &'static str>;

/// One TLV: its tag, contents and what follows. Single-byte tags and
/// definite lengths only, as DER certificates use.
fn der_tlv(input: &[u8]) -> Der<'_> {
    const TRUNCATED: &str = "truncated DER";
    let (&tag, rest) = input.split_first().ok_or(TRUNCATED)?;
    if tag & 0x1f == 0x1f {
        return Err("unsupported DER tag");
    }
    let (&first, mut rest) = rest.split_first().ok_or(TRUNCATED)?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err("bad DER length");
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    if rest.len() < len {
        return Err(TRUNCATED);
    }
    let (contents, after) = rest.split_at(len);
    Ok((tag, contents, after))
}

/// One TLV that must have `tag`: its contents and what follows.
fn der_expect(input: &[u8], tag: u8) -> Result<(&[u8], &[u8]), &'static str> {
    let (got, contents, rest) = der_tlv(input)?;
    if got != tag {
        return Err("unexpected DER structure");
    }
    Ok((contents, rest))
}

/// The SAN DNS names of a DER certificate, or its subject CNs when it has
/// none. Raw: not yet checked to be DNS names.
fn cert_names(der: &[u8]) -> Result<Vec<String>, &'static str> {
    let (cert, _) = der_expect(der, DER_SEQUENCE)?;
    let (tbs, _) = der_expect(cert, DER_SEQUENCE)?;
    let mut rest = tbs;
    if let (DER_VERSION, _, after) = der_tlv(rest)? {
        rest = after;
    }
    let (_serial, rest) = der_expect(rest, DER_INTEGER)?;
    let (_signature, rest) = der_expect(rest, DER_SEQUENCE)?;
    let (_issuer, rest) = der_expect(rest, DER_SEQUENCE)?;
    let (_validity, rest) = der_expect(rest, DER_SEQUENCE)?;
    let (subject, rest) = der_expect(rest, DER_SEQUENCE)?;
    let (_spki, mut rest) = der_expect(rest, DER_SEQUENCE)?;
    let mut names = Vec::new();
    while !rest.is_empty() {
        let (tag, contents, after) = der_tlv(rest)?;
        rest = after;
        if tag == DER_EXTENSIONS {
            san_dns_names(contents, &mut names)?;
        }
    }
    if names.is_empty() {
        subject_cns(subject, &mut names)?;
    }
    Ok(names)
}

fn san_dns_names(extensions: &[u8], names: &mut Vec<String>) -> Result<(), &'static str> {
    let (mut exts, _) = der_expect(extensions, DER_SEQUENCE)?;
    while !exts.is_empty() {
        let (ext, after) = der_expect(exts, DER_SEQUENCE)?;
        exts = after;
        let (oid, ext) = der_expect(ext, DER_OID)?;
        if oid != OID_SAN {
            continue;
        }
        let (tag, contents, after) = der_tlv(ext)?;
        let value = match tag {
            DER_BOOLEAN => der_expect(after, DER_OCTET_STRING)?.0,
            DER_OCTET_STRING => contents,
            _ => return Err("unexpected DER structure"),
        };
        let (mut general_names, _) = der_expect(value, DER_SEQUENCE)?;
        while !general_names.is_empty() {
            let (tag, contents, after) = der_tlv(general_names)?;
            general_names = after;
            if tag == DER_DNS_NAME {
                let name =
                    std::str::from_utf8(contents).map_err(|_| "a SAN DNS name is not text")?;
                names.push(name.to_string());
            }
        }
    }
    Ok(())
}

fn subject_cns(subject: &[u8], names: &mut Vec<String>) -> Result<(), &'static str> {
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (mut rdn, after) = der_expect(rdns, DER_SET)?;
        rdns = after;
        while !rdn.is_empty() {
            let (attribute, after) = der_expect(rdn, DER_SEQUENCE)?;
            rdn = after;
            let (oid, value) = der_expect(attribute, DER_OID)?;
            let (tag, contents, _) = der_tlv(value)?;
            // UTF8String, PrintableString, TeletexString, IA5String.
            if oid == OID_CN && matches!(tag, 0x0c | 0x13 | 0x14 | 0x16) {
                if let Ok(name) = std::str::from_utf8(contents) {
                    names.push(name.to_string());
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Sniffing

/// What the first bytes of a connection say about TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsSniff {
    /// A TLS handshake record: `0x16 0x03 0x00..=0x04`.
    Tls,
    /// Not TLS (plaintext HTTP starts with a method or `PRI`).
    NotTls,
    /// Too few bytes to tell; at most [`TLS_SNIFF_BYTES`] are needed.
    NeedMore,
}

/// How many bytes [`sniff_tls`] needs at most to decide.
pub const TLS_SNIFF_BYTES: usize = 3;

/// Classifies the first bytes of a connection: a TLS ClientHello record
/// starts `0x16` (handshake) `0x03` `0x00..=0x04` (SSL 3.0 to TLS 1.3 record
/// versions). Decides on the first byte for anything but `0x16`.
pub fn sniff_tls(first_bytes: &[u8]) -> TlsSniff {
    match first_bytes {
        [] | [0x16] | [0x16, 0x03] => TlsSniff::NeedMore,
        [0x16, 0x03, 0x00..=0x04, ..] => TlsSniff::Tls,
        _ => TlsSniff::NotTls,
    }
}

/// Whether `first_bytes` start a TLS handshake record; false also when
/// there are too few bytes to tell (see [`sniff_tls`]).
pub fn looks_like_tls(first_bytes: &[u8]) -> bool {
    sniff_tls(first_bytes) == TlsSniff::Tls
}

// ---------------------------------------------------------------------------
// Upstream

/// TLS from the ALB to origins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSpec {
    /// PEM CA certificates that origins' certificates must chain to.
    /// Required: there are no built-in roots and no way to skip
    /// verification. For a self-signed origin, name its certificate here.
    pub ca_file: PathBuf,
    /// A client certificate chain (PEM) for origins that require one; with
    /// `key_file`, both or neither.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name sent as SNI and verified in the origin's certificate;
    /// default the endpoint's host. An IP address is verified against the
    /// certificate's IP SANs and sends no SNI.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Protocols offered by ALPN, in preference order: `h2`, `http/1.1`.
    /// Empty sends no ALPN (the origin then speaks HTTP/1.1).
    #[serde(default = "default_upstream_alpn")]
    pub alpn: Vec<String>,
}

fn default_upstream_alpn() -> Vec<String> {
    vec!["http/1.1".into()]
}

impl UpstreamTlsSpec {
    /// The name to connect with to an endpoint whose host is
    /// `endpoint_host` (a DNS name or an IP address, IPv6 with or without
    /// brackets): `server_name` if set, else the host.
    pub fn server_name_for(&self, endpoint_host: &str) -> Result<ServerName<'static>, TlsError> {
        let (field, name) = match &self.server_name {
            Some(name) => ("upstream_tls.server_name", name.as_str()),
            None => (
                "endpoint host",
                endpoint_host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(endpoint_host),
            ),
        };
        ServerName::try_from(name.to_string()).map_err(|_| TlsError::Invalid {
            field: field.into(),
            problem: format!("{name:?} is neither a DNS name nor an IP address"),
        })
    }
}

/// The client config for connecting to origins: roots from `ca_file`, the
/// client certificate if any, ALPN as configured. Pair it with
/// [`UpstreamTlsSpec::server_name_for`] at connect time.
pub fn upstream_client_config(spec: &UpstreamTlsSpec) -> Result<Arc<ClientConfig>, TlsError> {
    const FIELD: &str = "upstream_tls";
    if let Some(name) = &spec.server_name {
        spec.server_name_for(name)?;
    }
    let mut alpn: Vec<Vec<u8>> = Vec::with_capacity(spec.alpn.len());
    for protocol in &spec.alpn {
        if !matches!(protocol.as_str(), "h2" | "http/1.1") {
            return Err(TlsError::Invalid {
                field: format!("{FIELD}.alpn"),
                problem: format!("{protocol:?} is not offered: use \"h2\" and/or \"http/1.1\""),
            });
        }
        if alpn.contains(&protocol.as_bytes().to_vec()) {
            return Err(TlsError::Invalid {
                field: format!("{FIELD}.alpn"),
                problem: format!("{protocol:?} is listed twice"),
            });
        }
        alpn.push(protocol.as_bytes().to_vec());
    }

    let ca_field = format!("{FIELD}.ca_file");
    let mut roots = RootCertStore::empty();
    for cert in read_certs(&ca_field, &spec.ca_file)? {
        roots.add(cert).map_err(|e| {
            bad_file(
                &ca_field,
                &spec.ca_file,
                format!("not a usable CA certificate: {e}"),
            )
        })?;
    }

    let provider = provider();
    let client_cert = match (&spec.cert_file, &spec.key_file) {
        (None, None) => None,
        (Some(cert_file), Some(key_file)) => {
            Some(load_certified_key(FIELD, cert_file, key_file, &provider)?)
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(TlsError::Invalid {
                field: format!("{FIELD}.cert_file/key_file"),
                problem: "a client certificate needs both cert_file and key_file, or neither"
                    .into(),
            });
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            field: FIELD.into(),
            problem: format!("the crypto provider refuses the default TLS versions: {e}"),
        })?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some(key) => builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key))),
    };
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, SanType,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    /// A test CA in a tempdir, issuing leaves as PEM files.
    struct Pki {
        dir: tempfile::TempDir,
        ca: CertifiedIssuer<'static, KeyPair>,
        ca_file: PathBuf,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(DnType::CommonName, "Switchyard Test CA");
            let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
            let ca_file = dir.path().join("ca.pem");
            std::fs::write(&ca_file, ca.pem()).unwrap();
            Pki { dir, ca, ca_file }
        }

        /// Issues a leaf for `params` to `<stem>.pem` (leaf then CA) and
        /// `<stem>.key`; returns the files and the leaf.
        fn issue(
            &self,
            stem: &str,
            params: CertificateParams,
        ) -> (CertSpec, CertificateDer<'static>) {
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca).unwrap();
            let files = CertSpec {
                cert_file: self.dir.path().join(format!("{stem}.pem")),
                key_file: self.dir.path().join(format!("{stem}.key")),
            };
            std::fs::write(&files.cert_file, cert.pem() + &self.ca.pem()).unwrap();
            std::fs::write(&files.key_file, key.serialize_pem()).unwrap();
            (files, cert.der().clone())
        }

        /// A server leaf for `sans`, with the CN `stem`.
        fn leaf(&self, stem: &str, sans: &[&str]) -> (CertSpec, CertificateDer<'static>) {
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, stem);
            self.issue(stem, params)
        }

        fn roots(&self) -> RootCertStore {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.der().clone()).unwrap();
            roots
        }

        fn client_config(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
            let mut config = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(self.roots())
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Arc::new(config)
        }
    }

    /// The store used by most tests and its leaves: the default (also for
    /// 127.0.0.1), `a.example.com`, `*.wild.example.com` and
    /// `exact.wild.example.com`.
    struct Fixture {
        pki: Pki,
        spec: ServerTlsSpec,
        default: CertificateDer<'static>,
        a: CertificateDer<'static>,
        wild: CertificateDer<'static>,
        exact_wild: CertificateDer<'static>,
    }

    fn fixture() -> Fixture {
        let pki = Pki::new();
        let mut params = CertificateParams::new(vec!["default.example.com".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "default");
        let (default_files, default) = pki.issue("default", params);
        let (a_files, a) = pki.leaf("a", &["a.example.com"]);
        let (wild_files, wild) = pki.leaf("wild", &["*.wild.example.com"]);
        let (exact_files, exact_wild) = pki.leaf("exact-wild", &["exact.wild.example.com"]);
        let spec = ServerTlsSpec {
            certificates: vec![default_files, a_files, wild_files, exact_files],
            reload_interval_seconds: 10,
        };
        Fixture {
            pki,
            spec,
            default,
            a,
            wild,
            exact_wild,
        }
    }

    fn served(store: &CertStore, sni: Option<&str>) -> CertificateDer<'static> {
        store.resolve_name(sni).cert[0].clone()
    }

    #[test]
    fn sni_picks_exact_then_one_label_wildcard_then_the_default() {
        let f = fixture();
        let store = CertStore::load(&f.spec).unwrap();
        assert_eq!(
            store.names(),
            vec![
                vec!["default.example.com".to_string()],
                vec!["a.example.com".to_string()],
                vec!["*.wild.example.com".to_string()],
                vec!["exact.wild.example.com".to_string()],
            ]
        );
        assert_eq!(served(&store, Some("a.example.com")), f.a);
        assert_eq!(served(&store, Some("A.Example.COM")), f.a);
        assert_eq!(served(&store, Some("a.example.com.")), f.a);
        assert_eq!(served(&store, Some("x.wild.example.com")), f.wild);
        assert_eq!(served(&store, Some("X.WILD.Example.com")), f.wild);
        // Exact beats wildcard.
        assert_eq!(served(&store, Some("exact.wild.example.com")), f.exact_wild);
        // A wildcard covers one label: not two, not none.
        assert_eq!(served(&store, Some("a.b.wild.example.com")), f.default);
        assert_eq!(served(&store, Some("wild.example.com")), f.default);
        assert_eq!(served(&store, Some("unknown.test")), f.default);
        assert_eq!(served(&store, Some("default.example.com")), f.default);
        assert_eq!(served(&store, None), f.default);
    }

    #[test]
    fn names_come_from_the_san_else_the_cn_and_the_first_claim_wins() {
        let pki = Pki::new();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "CN-Only.Example.com");
        let (cn_files, cn) = pki.issue("cn", params);
        let (first_files, first) = pki.leaf("first", &["dup.example.com", "*.Star.example.com"]);
        let (second_files, _) = pki.leaf("second", &["dup.example.com", "*.com", "f*.example.com"]);
        let spec = ServerTlsSpec {
            certificates: vec![cn_files, first_files, second_files],
            reload_interval_seconds: 0,
        };
        let store = CertStore::load(&spec).unwrap();
        assert_eq!(
            store.names(),
            vec![
                vec!["cn-only.example.com".to_string()],
                vec![
                    "dup.example.com".to_string(),
                    "*.star.example.com".to_string()
                ],
                vec!["dup.example.com".to_string()],
            ]
        );
        assert_eq!(served(&store, Some("cn-only.example.com")), cn);
        assert_eq!(served(&store, Some("dup.example.com")), first);
        assert_eq!(served(&store, Some("x.star.example.com")), first);
        // `*.com` is not a wildcard we serve.
        assert_eq!(served(&store, Some("example.com")), cn);
    }

    #[test]
    fn the_name_reader_rejects_mangled_certificates_without_panicking() {
        let f = fixture();
        let der = f.a.as_ref();
        assert_eq!(cert_names(der).unwrap(), vec!["a.example.com".to_string()]);
        for len in 0..der.len() {
            assert!(cert_names(&der[..len]).is_err(), "prefix of {len} bytes");
        }
        for i in 0..der.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bytes = der.to_vec();
                bytes[i] ^= flip;
                let _ = cert_names(&bytes);
            }
        }
    }

    #[test]
    fn reload_swaps_in_new_certificates_and_a_broken_file_keeps_the_old() {
        let f = fixture();
        let store = CertStore::load(&f.spec).unwrap();
        assert!(!store.files_changed());
        assert!(store.reload_if_changed().is_none());

        // A new certificate for a.example.com, in the same files.
        let (_, new_a) = f.pki.leaf("a", &["a.example.com", "also-a.example.com"]);
        assert!(store.files_changed());
        assert_eq!(served(&store, Some("a.example.com")), f.a);
        assert_eq!(store.reload(&f.spec).unwrap(), 4);
        assert!(!store.files_changed());
        assert_eq!(served(&store, Some("a.example.com")), new_a);
        assert_eq!(served(&store, Some("also-a.example.com")), new_a);

        // A missing file and a key of another certificate are named too.
        let mut spec = f.spec.clone();
        spec.certificates[2].cert_file = f.pki.dir.path().join("missing.pem");
        let e = store.reload(&spec).unwrap_err().to_string();
        assert!(
            e.starts_with("tls.certificates[2].cert_file ")
                && e.contains("missing.pem: cannot read the file"),
            "{e}"
        );
        let mut spec = f.spec.clone();
        spec.certificates[1].key_file = f.spec.certificates[2].key_file.clone();
        let e = store.reload(&spec).unwrap_err().to_string();
        assert!(
            e.starts_with("tls.certificates[1]: the certificate in "),
            "{e}"
        );
        assert!(e.contains("do not make a usable pair"), "{e}");
        let e = store
            .reload(&ServerTlsSpec {
                certificates: vec![],
                reload_interval_seconds: 0,
            })
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("tls.certificates: at least one"), "{e}");
        assert_eq!(served(&store, Some("a.example.com")), new_a);

        // A broken key: the error names the field and the file; the
        // certificates in force stay, and the change stays pending.
        let key_file = &f.spec.certificates[1].key_file;
        std::fs::write(
            key_file,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = store.reload_if_changed().unwrap().unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "tls.certificates[1].key_file {}: no private key found (expected an unencrypted PEM key: PKCS#8, PKCS#1 RSA or SEC1 EC)",
                key_file.display()
            )
        );
        assert_eq!(served(&store, Some("a.example.com")), new_a);
        assert!(store.files_changed());

        // A new list replaces the old one and is what gets watched.
        let spec = ServerTlsSpec {
            certificates: vec![f.spec.certificates[2].clone()],
            reload_interval_seconds: 0,
        };
        assert_eq!(store.reload(&spec).unwrap(), 1);
        assert!(!store.files_changed());
        assert_eq!(served(&store, Some("a.example.com")), f.wild);
    }

    #[tokio::test]
    async fn the_reloader_follows_the_files_and_stops_on_shutdown() {
        let f = fixture();
        let store = Arc::new(CertStore::load(&f.spec).unwrap());
        let (results_tx, mut results) = tokio::sync::mpsc::unbounded_channel();
        let (stop, shutdown) = watch::channel(false);
        let task = spawn_reloader(
            store.clone(),
            Duration::from_millis(20),
            shutdown,
            move |r: Result<usize, TlsError>| {
                let _ = results_tx.send(r.map_err(|e| e.to_string()));
            },
        );
        let wait = Duration::from_secs(10);

        let (_, new_a) = f.pki.leaf("a", &["a.example.com"]);
        let result = tokio::time::timeout(wait, results.recv()).await.unwrap();
        assert_eq!(result, Some(Ok(4)));
        assert_eq!(served(&store, Some("a.example.com")), new_a);

        std::fs::write(&f.spec.certificates[3].cert_file, "garbage").unwrap();
        let result = tokio::time::timeout(wait, results.recv()).await.unwrap();
        let e = result.unwrap().unwrap_err();
        assert!(e.starts_with("tls.certificates[3].cert_file "), "{e}");
        assert_eq!(served(&store, Some("exact.wild.example.com")), f.exact_wild);

        stop.send(true).unwrap();
        tokio::time::timeout(wait, task).await.unwrap().unwrap();

        // Zero: no polling at all.
        let (_stop, shutdown) = watch::channel(false);
        let task = spawn_reloader(store, Duration::ZERO, shutdown, |_| {});
        tokio::time::timeout(wait, task).await.unwrap().unwrap();
    }

    #[test]
    fn a_client_hello_looks_like_tls_and_http_does_not() {
        let f = fixture();
        let mut client = rustls::ClientConnection::new(
            f.pki.client_config(&[ALPN_H2]),
            ServerName::try_from("a.example.com").unwrap(),
        )
        .unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        assert!(looks_like_tls(&hello));
        assert_eq!(sniff_tls(&hello[..TLS_SNIFF_BYTES]), TlsSniff::Tls);
        assert_eq!(sniff_tls(&hello[..2]), TlsSniff::NeedMore);
        assert_eq!(sniff_tls(&hello[..1]), TlsSniff::NeedMore);
        assert_eq!(sniff_tls(&[]), TlsSniff::NeedMore);
        assert!(!looks_like_tls(&hello[..2]));

        assert!(!looks_like_tls(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!looks_like_tls(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert_eq!(sniff_tls(b"G"), TlsSniff::NotTls);
        assert_eq!(sniff_tls(&[0x16, 0x03, 0x05]), TlsSniff::NotTls);
        assert_eq!(sniff_tls(&[0x16, 0x02]), TlsSniff::NotTls);
    }

    /// Runs one handshake plus a byte each way; returns the certificate
    /// the client saw and the negotiated ALPN.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: &str,
    ) -> (CertificateDer<'static>, Option<Vec<u8>>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from(name.to_string()).unwrap();
        let serve = async move {
            let mut tls = TlsAcceptor::from(server).accept(server_io).await.unwrap();
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.unwrap();
            tls.write_all(&byte).await.unwrap();
            tls.flush().await.unwrap();
            tls
        };
        let call = async move {
            let mut tls = TlsConnector::from(client)
                .connect(name, client_io)
                .await
                .unwrap();
            tls.write_all(b"x").await.unwrap();
            tls.flush().await.unwrap();
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.unwrap();
            assert_eq!(&byte, b"x");
            tls
        };
        let (_server, client) = tokio::join!(serve, call);
        let conn = client.get_ref().1;
        (
            conn.peer_certificates().unwrap()[0].clone(),
            conn.alpn_protocol().map(|p| p.to_vec()),
        )
    }

    #[tokio::test]
    async fn a_handshake_gets_the_sni_certificate_and_h2() {
        let f = fixture();
        let server = server_config(Arc::new(CertStore::load(&f.spec).unwrap()));

        let client = f.pki.client_config(&[ALPN_H2, ALPN_HTTP1]);
        let (leaf, alpn) = handshake(server.clone(), client, "a.example.com").await;
        assert_eq!(leaf, f.a);
        assert_eq!(
            cert_names(&leaf).unwrap(),
            vec!["a.example.com".to_string()]
        );
        assert_eq!(alpn.as_deref(), Some(ALPN_H2));

        // The server's preference decides; a client without h2 gets 1.1.
        let client = f.pki.client_config(&[ALPN_HTTP1, ALPN_H2]);
        let (leaf, alpn) = handshake(server.clone(), client, "x.wild.example.com").await;
        assert_eq!((leaf, alpn.as_deref()), (f.wild.clone(), Some(ALPN_H2)));
        let client = f.pki.client_config(&[ALPN_HTTP1]);
        let (_, alpn) = handshake(server.clone(), client, "a.example.com").await;
        assert_eq!(alpn.as_deref(), Some(ALPN_HTTP1));

        // An IP address sends no SNI: the default certificate.
        let client = f.pki.client_config(&[]);
        let (leaf, alpn) = handshake(server, client, "127.0.0.1").await;
        assert_eq!((leaf, alpn), (f.default.clone(), None));
    }

    fn origin_config(leaf: &CertSpec, client_roots: Option<RootCertStore>) -> Arc<ServerConfig> {
        let key =
            load_certified_key("origin", &leaf.cert_file, &leaf.key_file, &provider()).unwrap();
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_roots {
            None => builder.with_no_client_auth(),
            Some(roots) => builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .unwrap(),
            ),
        };
        let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Arc::new(config)
    }

    #[tokio::test]
    async fn upstream_mutual_tls_against_an_origin_that_requires_client_certificates() {
        let pki = Pki::new();
        let (origin, _) = pki.leaf("origin", &["origin.internal"]);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "alb");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (alb, alb_leaf) = pki.issue("alb-client", params);
        let server = origin_config(&origin, Some(pki.roots()));

        let spec = UpstreamTlsSpec {
            ca_file: pki.ca_file.clone(),
            cert_file: Some(alb.cert_file.clone()),
            key_file: Some(alb.key_file.clone()),
            server_name: Some("origin.internal".into()),
            alpn: vec!["h2".into()],
        };
        let client = upstream_client_config(&spec).unwrap();
        let name = spec.server_name_for("10.0.0.5").unwrap();
        assert_eq!(name, ServerName::try_from("origin.internal").unwrap());

        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let accept = TlsAcceptor::from(server.clone()).accept(server_io);
        let connect = TlsConnector::from(client).connect(name.clone(), client_io);
        let (accepted, connected) = tokio::join!(accept, connect);
        let accepted = accepted.unwrap();
        let connected = connected.unwrap();
        assert_eq!(
            accepted.get_ref().1.peer_certificates().unwrap()[0],
            alb_leaf
        );
        assert_eq!(connected.get_ref().1.alpn_protocol(), Some(ALPN_H2));

        // Without the client certificate the origin refuses.
        let spec = UpstreamTlsSpec {
            cert_file: None,
            key_file: None,
            ..spec
        };
        let client = upstream_client_config(&spec).unwrap();
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let accept = TlsAcceptor::from(server).accept(server_io);
        let connect = async move {
            let mut tls = TlsConnector::from(client).connect(name, client_io).await?;
            let mut byte = [0u8; 1];
            tls.read(&mut byte).await
        };
        let (accepted, connected) = tokio::join!(accept, connect);
        assert!(accepted.is_err());
        assert!(connected.is_err());
    }

    #[tokio::test]
    async fn a_self_signed_origin_is_trusted_by_naming_its_certificate() {
        let pki = Pki::new();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["self.internal".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let origin = CertSpec {
            cert_file: pki.dir.path().join("self.pem"),
            key_file: pki.dir.path().join("self.key"),
        };
        std::fs::write(&origin.cert_file, cert.pem()).unwrap();
        std::fs::write(&origin.key_file, key.serialize_pem()).unwrap();
        let server = origin_config(&origin, None);

        let spec = UpstreamTlsSpec {
            ca_file: origin.cert_file.clone(),
            cert_file: None,
            key_file: None,
            server_name: None,
            alpn: default_upstream_alpn(),
        };
        let client = upstream_client_config(&spec).unwrap();
        let name = spec.server_name_for("self.internal").unwrap();
        let (leaf, alpn) = handshake(server.clone(), client, "self.internal").await;
        assert_eq!(leaf, *cert.der());
        assert_eq!(alpn.as_deref(), Some(ALPN_HTTP1));
        assert_eq!(name, ServerName::try_from("self.internal").unwrap());

        // The CA of another PKI does not vouch for it.
        let spec = UpstreamTlsSpec {
            ca_file: pki.ca_file.clone(),
            ..spec
        };
        let client = upstream_client_config(&spec).unwrap();
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let accept = TlsAcceptor::from(server).accept(server_io);
        let connect = TlsConnector::from(client).connect(name, client_io);
        let (_, connected) = tokio::join!(accept, connect);
        assert!(connected.is_err());
    }

    #[test]
    fn upstream_settings_are_checked_and_named() {
        let pki = Pki::new();
        let (alb, _) = pki.leaf("alb", &["alb.internal"]);
        let spec = UpstreamTlsSpec {
            ca_file: pki.ca_file.clone(),
            cert_file: None,
            key_file: None,
            server_name: None,
            alpn: default_upstream_alpn(),
        };
        let err = |spec: UpstreamTlsSpec| upstream_client_config(&spec).unwrap_err().to_string();

        let e = err(UpstreamTlsSpec {
            cert_file: Some(alb.cert_file.clone()),
            ..spec.clone()
        });
        assert!(e.starts_with("upstream_tls.cert_file/key_file: "), "{e}");
        let e = err(UpstreamTlsSpec {
            ca_file: pki.dir.path().join("nope.pem"),
            ..spec.clone()
        });
        assert!(
            e.starts_with("upstream_tls.ca_file ") && e.contains("nope.pem"),
            "{e}"
        );
        let e = err(UpstreamTlsSpec {
            ca_file: alb.key_file.clone(),
            ..spec.clone()
        });
        assert!(e.contains("no PEM certificate found"), "{e}");
        let e = err(UpstreamTlsSpec {
            cert_file: Some(alb.cert_file.clone()),
            key_file: Some(alb.cert_file.clone()),
            ..spec.clone()
        });
        assert!(
            e.starts_with("upstream_tls.key_file ") && e.contains("no private key"),
            "{e}"
        );
        let e = err(UpstreamTlsSpec {
            alpn: vec!["http/2".into()],
            ..spec.clone()
        });
        assert!(e.starts_with("upstream_tls.alpn: \"http/2\""), "{e}");
        let e = err(UpstreamTlsSpec {
            alpn: vec!["h2".into(), "h2".into()],
            ..spec.clone()
        });
        assert!(e.contains("listed twice"), "{e}");
        let e = err(UpstreamTlsSpec {
            server_name: Some("not a name".into()),
            ..spec.clone()
        });
        assert!(e.starts_with("upstream_tls.server_name: "), "{e}");

        assert!(upstream_client_config(&UpstreamTlsSpec {
            alpn: vec![],
            ..spec.clone()
        })
        .is_ok());
        assert_eq!(
            spec.server_name_for("[::1]").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        assert_eq!(
            spec.server_name_for("origin.example").unwrap(),
            ServerName::try_from("origin.example").unwrap()
        );
        let e = spec.server_name_for("bad host").unwrap_err().to_string();
        assert!(e.starts_with("endpoint host: "), "{e}");
    }

    #[test]
    fn specs_read_from_yaml_with_defaults_and_no_unknown_fields() {
        let spec: ServerTlsSpec = serde_yaml_ng::from_str(
            "certificates:\n  - cert_file: /etc/a.pem\n    key_file: /etc/a.key\n",
        )
        .unwrap();
        assert_eq!(spec.reload_interval(), Duration::from_secs(10));
        assert_eq!(spec.certificates[0].key_file, PathBuf::from("/etc/a.key"));
        let e = serde_yaml_ng::from_str::<ServerTlsSpec>(
            "certificates:\n  - cert_file: /a\n    key_file: /b\n    keyfile: /c\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("keyfile"), "{e}");

        let spec: UpstreamTlsSpec = serde_yaml_ng::from_str("ca_file: /etc/ca.pem\n").unwrap();
        assert_eq!(spec.alpn, vec!["http/1.1".to_string()]);
        assert_eq!(spec.server_name, None);
        let e = serde_yaml_ng::from_str::<UpstreamTlsSpec>("alpn: [h2]\n").unwrap_err();
        assert!(e.to_string().contains("ca_file"), "{e}");
        let e = serde_yaml_ng::from_str::<UpstreamTlsSpec>(
            "ca_file: /ca\ninsecure_skip_verify: true\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("insecure_skip_verify"), "{e}");
    }
}
