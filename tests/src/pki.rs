//! Test certificates (rcgen): a CA, a server certificate and a client
//! certificate it signed, as PEM text and as files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA with one server and one client certificate, PEM.
pub struct Pki {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

/// The PEM files of a [`Pki`].
pub struct PkiFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// A fresh CA; the server certificate names `server_names` (DNS names or
    /// IP addresses), the client certificate `operator`.
    pub fn generate(server_names: &[&str]) -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Switchyard test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names.clone()).expect("params");
            params
                .distinguished_name
                .push(DnType::CommonName, names[0].as_str());
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca).expect("signed certificate");
            (cert.pem(), key.serialize_pem())
        };
        let names = server_names.iter().map(|s| s.to_string()).collect();
        let (server_cert, server_key) = leaf(names, ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) =
            leaf(vec!["operator".into()], ExtendedKeyUsagePurpose::ClientAuth);
        Pki {
            ca: ca.pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }

    /// Writes the PEM files into `dir`.
    pub fn write(&self, dir: &Path) -> PkiFiles {
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write PEM file");
            p
        };
        PkiFiles {
            ca: write("ca.pem", &self.ca),
            server_cert: write("server.pem", &self.server_cert),
            server_key: write("server.key", &self.server_key),
            client_cert: write("client.pem", &self.client_cert),
            client_key: write("client.key", &self.client_key),
        }
    }
}
