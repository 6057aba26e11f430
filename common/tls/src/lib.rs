//! TLS to the services Larder uses: the CA files an operator
//! adds to the system's roots for S3 and RabbitMQ, read and checked once
//! when a service opens, and the one cryptography provider every rustls
//! client in the process uses.
//!
//! Each client library takes extra roots its own way (PEM bytes for the S3
//! client, a PEM string for lapin; sqlx reads PostgreSQL's `sslrootcert`
//! itself), and some of them panic on a certificate they cannot parse or
//! skip it without a word. [`CaFile::read`] parses every certificate as a
//! trust anchor first, so a wrong file is a clear error at start rather than
//! a panic or an unexplained "unknown issuer" later.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Why a CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading CA file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("CA file {path}: certificate {index} is not a usable CA certificate: {reason}")]
    Invalid {
        path: PathBuf,
        /// From 1, in file order.
        index: usize,
        reason: String,
    },
}

/// A PEM file of CA certificates, each checked to parse as a trust anchor.
#[derive(Debug, Clone)]
pub struct CaFile {
    path: PathBuf,
    pem: String,
}

impl CaFile {
    /// Reads `path` and checks every certificate in it.
    pub fn read(path: &Path) -> Result<Self, TlsError> {
        let read_error = |source| TlsError::Read {
            path: path.to_owned(),
            source,
        };
        let bytes = std::fs::read(path).map_err(read_error)?;
        let invalid = |index, reason: String| TlsError::Invalid {
            path: path.to_owned(),
            index,
            reason,
        };
        // Parsed as the clients will: PEM sections, then each as an anchor.
        let mut roots = rustls::RootCertStore::empty();
        for (index, certificate) in CertificateDer::pem_slice_iter(&bytes).enumerate() {
            let certificate = certificate.map_err(|error| invalid(index + 1, error.to_string()))?;
            roots
                .add(certificate)
                .map_err(|error| invalid(index + 1, error.to_string()))?;
        }
        if roots.is_empty() {
            return Err(TlsError::NoCertificate {
                path: path.to_owned(),
            });
        }
        // PEM is ASCII, and every section parsed: the text is UTF-8.
        let pem = String::from_utf8(bytes).map_err(|error| {
            read_error(std::io::Error::new(std::io::ErrorKind::InvalidData, error))
        })?;
        Ok(Self {
            path: path.to_owned(),
            pem,
        })
    }

    /// Reads `path` if there is one.
    pub fn read_optional(path: Option<&Path>) -> Result<Option<Self>, TlsError> {
        path.map(Self::read).transpose()
    }

    /// The file's text: PEM certificates (and whatever text surrounds them).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Where it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Makes ring the process's default rustls cryptography provider, for the
/// clients that take the default (lapin's). rustls picks one by itself only
/// when exactly one provider is built in; installing it says which. Ring
/// builds without cmake or a C toolchain, unlike aws-lc. Idempotent.
pub fn install_crypto_provider() {
    // An error means a provider is installed already, which is the aim.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A hint for an error message whose cause chain `chain` reports a
/// certificate the client did not trust, naming the setting that adds a CA
/// (`setting`, e.g. `[storage] ca-file`); empty otherwise.
pub fn untrusted_certificate_hint(chain: &str, setting: &str) -> String {
    // rustls's wording for a certificate that does not verify.
    if chain.contains("invalid peer certificate") {
        format!(
            " (the server's certificate is not trusted: add its CA with {setting}, or install it \
             in the system's store or SSL_CERT_FILE)"
        )
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA (EC P-256, valid until 2126), as `openssl req -x509`
    /// makes one; its key was thrown away.
    const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBpDCCAUmgAwIBAgIUMfaGfrSJrZVvzSShgGXQKy1GVMowCgYIKoZIzj0EAwIw
HjEcMBoGA1UEAwwTTGFyZGVyIHVuaXQgdGVzdCBDQTAgFw0yNjEyMDYyMzE0MTVa
GA8yMTI2MTExMjIzMTQxNVowHjEcMBoGA1UEAwwTTGFyZGVyIHVuaXQgdGVzdCBD
QTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABPL0FPEXThCqoB+n5KzbGZg9vc4B
KiUE0ZnjJ6UNsZnmvhANmCI9ohHNNe908UnZOktWNPYcrAhiSK8ahNs7pg+jYzBh
MB0GA1UdDgQWBBQr+8z1GYSBY7hD8FYxiCpceJn+UDAfBgNVHSMEGDAWgBQr+8z1
GYSBY7hD8FYxiCpceJn+UDAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIB
BjAKBggqhkjOPQQDAgNJADBGAiEAhQe1CRKBsifiAPugreXh1ygbaz3wFDuDnKvw
k8JM5KECIQD8IiBXzwkw9BB2+Fps06ZhQHbSrZMdK1EUpC0URGDaug==
-----END CERTIFICATE-----
";

    fn file_with(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("a temporary file");
        std::fs::write(file.path(), text).expect("writing it");
        file
    }

    #[test]
    fn a_pem_ca_is_read_whole() {
        let file = file_with(&format!("# the CA\n{CA}"));
        let ca = CaFile::read(file.path()).expect("a CA file");
        assert!(ca.pem().contains(CA));
        assert_eq!(ca.path(), file.path());
    }

    #[test]
    fn unusable_files_are_refused_with_the_reason() {
        let missing = CaFile::read(Path::new("/nonexistent/ca.pem")).expect_err("missing");
        assert!(matches!(missing, TlsError::Read { .. }), "{missing}");

        let empty = file_with("not a certificate\n");
        let error = CaFile::read(empty.path()).expect_err("no certificate");
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");

        let garbage = file_with("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        let error = CaFile::read(garbage.path()).expect_err("not a certificate");
        assert!(
            matches!(error, TlsError::Invalid { index: 1, .. }),
            "{error}"
        );
    }

    #[test]
    fn only_certificate_errors_get_the_hint() {
        let hint = untrusted_certificate_hint(
            "dispatch failure: io error: invalid peer certificate: UnknownIssuer",
            "[storage] ca-file",
        );
        assert!(hint.contains("[storage] ca-file"), "{hint}");
        assert!(untrusted_certificate_hint("connection refused", "x").is_empty());
    }
}
