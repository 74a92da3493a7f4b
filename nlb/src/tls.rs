//! TLS for the NLB's own ports (rustls with the ring provider): a server
//! config built from PEM files, behind one atomic pointer so certificates
//! and keys are replaced without a restart. New connections use the new
//! config; connections already up keep theirs.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::auth::FileStamp;
use crate::config::TlsFiles;

/// Why a port's TLS config could not be built. The message names the file.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("TLS for the {port} port: {message}")]
pub struct TlsError {
    pub port: &'static str,
    pub message: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(
    port: &'static str,
    what: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |m: String| TlsError { port, message: m };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(format!("cannot read {what} {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("{what} {} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(err(format!(
            "{what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// Builds a server config from `files`, offering `alpn`.
pub fn server_config(
    port: &'static str,
    files: &TlsFiles,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let err = |m: String| TlsError { port, message: m };
    let certs = read_certs(port, "certificate file", &files.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|e| {
        err(format!(
            "cannot read a PEM private key from {}: {e}",
            files.key_file.display()
        ))
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?;
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(port, "client CA file", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| err(format!("client CA file {}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| err(format!("client CA file {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        err(format!(
            "certificate {} and key {} do not make a usable pair: {e}",
            files.cert_file.display(),
            files.key_file.display()
        ))
    })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

struct Source {
    files: TlsFiles,
    stamps: Vec<FileStamp>,
}

fn stamps(files: &TlsFiles) -> Vec<FileStamp> {
    let mut s = vec![
        FileStamp::of(&files.cert_file),
        FileStamp::of(&files.key_file),
    ];
    if let Some(ca) = &files.client_ca_file {
        s.push(FileStamp::of(ca));
    }
    s
}

/// One port's TLS, reloadable.
pub struct ReloadingTls {
    port: &'static str,
    alpn: Vec<&'static [u8]>,
    config: ArcSwap<ServerConfig>,
    source: Mutex<Source>,
}

impl ReloadingTls {
    pub fn new(
        port: &'static str,
        files: &TlsFiles,
        alpn: &[&'static [u8]],
    ) -> Result<Self, TlsError> {
        let stamps = stamps(files);
        let config = server_config(port, files, alpn)?;
        Ok(ReloadingTls {
            port,
            alpn: alpn.to_vec(),
            config: ArcSwap::new(config),
            source: Mutex::new(Source {
                files: files.clone(),
                stamps,
            }),
        })
    }

    pub fn port(&self) -> &'static str {
        self.port
    }

    /// An acceptor with the config in force.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.source.lock().files.client_ca_file.is_some()
    }

    /// Whether any file changed on disk since it was read.
    pub fn files_changed(&self) -> bool {
        let source = self.source.lock();
        stamps(&source.files) != source.stamps
    }

    /// Rebuilds from `files` (the paths may have changed too). On an error
    /// the config in force stays.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), TlsError> {
        let mut source = self.source.lock();
        let new_stamps = stamps(files);
        let config = server_config(self.port, files, &self.alpn)?;
        self.config.store(config);
        *source = Source {
            files: files.clone(),
            stamps: new_stamps,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> TlsFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_file = dir.join(format!("{name}.crt"));
        let key_file = dir.join(format!("{name}.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        TlsFiles {
            cert_file,
            key_file,
            client_ca_file: None,
        }
    }

    #[test]
    fn bad_files_are_named_and_keep_the_config_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let good = write_pair(dir.path(), "a");
        let tls = ReloadingTls::new("grpc", &good, &[b"h2"]).unwrap();
        assert!(!tls.files_changed());

        let missing = TlsFiles {
            cert_file: dir.path().join("nope.crt"),
            ..good.clone()
        };
        let e = tls.reload(&missing).unwrap_err();
        assert!(e.to_string().contains("nope.crt"), "{e}");

        let other = write_pair(dir.path(), "b");
        let mismatched = TlsFiles {
            key_file: other.key_file.clone(),
            ..good.clone()
        };
        let e = server_config("grpc", &mismatched, &[]).unwrap_err();
        assert!(e.to_string().contains("do not make a usable pair"), "{e}");

        std::fs::write(&good.cert_file, "not pem").unwrap();
        assert!(tls.files_changed());
        let e = tls.reload(&good).unwrap_err();
        assert!(e.to_string().contains("a.crt"), "{e}");
        // Still changed: the failed reload did not take the new stamps.
        assert!(tls.files_changed());

        assert!(tls.reload(&other).is_ok());
        assert!(!tls.files_changed());
    }

    #[test]
    fn a_client_ca_turns_on_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = write_pair(dir.path(), "a");
        let ca = write_pair(dir.path(), "ca");
        files.client_ca_file = Some(ca.cert_file);
        let tls = ReloadingTls::new("admin", &files, &[b"http/1.1"]).unwrap();
        assert!(tls.requires_client_cert());
        files.client_ca_file = Some(dir.path().join("a.key"));
        let e = server_config("admin", &files, &[]).unwrap_err();
        assert!(e.to_string().contains("client CA file"), "{e}");
    }
}
