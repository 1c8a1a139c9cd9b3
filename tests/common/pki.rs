//! A throwaway CA for the TLS tests (rcgen): no private key is committed, each test makes its own.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

/// A certificate and its key, as PEM files.
pub struct Pem {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert_pem = params.self_signed(&key).unwrap().pem();
        Ca { issuer: Issuer::new(params, key), cert_pem }
    }

    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, &self.cert_pem).unwrap();
        path.to_path_buf()
    }

    /// A leaf for `names` (DNS names or IP addresses), written as `<stem>.pem` and `<stem>-key.pem`.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> Pem {
        let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let pem = Pem { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}-key.pem")) };
        std::fs::write(&pem.cert, cert.pem()).unwrap();
        std::fs::write(&pem.key, key.serialize_pem()).unwrap();
        pem
    }
}
