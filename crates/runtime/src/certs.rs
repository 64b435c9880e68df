//! A development CA and its certificates (`recsysctl certs`): one certificate per service,
//! valid as a server and as a client, and one per operator, whose DNS name is the
//! identity the admin ports check. Production clusters get theirs from cert-manager or
//! their own CA; these are for `make run` with TLS and the tests.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// Names every service certificate carries besides its own, so that the loopback cluster
/// (`127.0.0.1:<port>`) and `localhost` verify.
const LOOPBACK_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// What `write_dev_certs` creates: `ca.pem` and `ca-key.pem`, then `<name>.pem` and
/// `<name>-key.pem` for every service and operator.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub dir: PathBuf,
}

impl DevCerts {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }

    /// The `[server.tls]` section of a process holding `name`'s certificate.
    pub fn tls_config(&self, name: &str, reload_ms: u64) -> crate::tls::TlsConfig {
        let path = |path: PathBuf| path.display().to_string();
        crate::tls::TlsConfig {
            enabled: true,
            ca_file: path(self.ca()),
            cert_file: path(self.cert(name)),
            key_file: path(self.key(name)),
            reload_ms,
        }
    }
}

/// Writes a new CA and certificates for `services` (with `extra_names` as further DNS
/// names, e.g. Kubernetes Service names) and `operators`. Each file is written beside
/// and renamed into place, so a process reloading them never reads half a file.
pub fn write_dev_certs(
    dir: &Path,
    services: &[&str],
    extra_names: &[String],
    operators: &[&str],
) -> anyhow::Result<DevCerts> {
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "recsys development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let certs = DevCerts { dir: dir.to_path_buf() };
    let issue = |name: &str, names: Vec<String>, usages: Vec<ExtendedKeyUsagePurpose>| -> anyhow::Result<()> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = usages;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let cert = params.signed_by(&key, &issuer)?;
        write_atomically(&certs.key(name), key.serialize_pem().as_bytes())?;
        write_atomically(&certs.cert(name), cert.pem().as_bytes())
    };
    for service in services {
        let mut names = vec![service.to_string()];
        names.extend(LOOPBACK_NAMES.iter().map(|name| name.to_string()));
        names.extend(extra_names.iter().cloned());
        issue(service, names, vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth])?;
    }
    for operator in operators {
        issue(operator, vec![operator.to_string()], vec![ExtendedKeyUsagePurpose::ClientAuth])?;
    }
    // The CA last: a process that reloads while these are written sees the new CA only
    // with the certificates it signed already in place.
    write_atomically(&certs.dir.join("ca-key.pem"), issuer.key().serialize_pem().as_bytes())?;
    write_atomically(&certs.ca(), ca_cert.pem().as_bytes())?;
    Ok(certs)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let staged = path.with_extension("pem.tmp");
    std::fs::write(&staged, bytes)?;
    std::fs::rename(&staged, path)?;
    Ok(())
}
