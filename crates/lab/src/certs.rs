//! Test certificates made with `openssl`: a CA, a second unrelated CA,
//! and a server certificate signed by the first for the names given, for
//! tests of TLS to clients and to the lab's servers.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory of PEM files: `ca.crt`, `other-ca.crt`, `server.crt` and
/// `server.key`; removed on drop.
pub struct Certs {
    pub dir: PathBuf,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Certs {
    /// A CA and a server certificate for `san` (openssl's
    /// subjectAltName syntax: `DNS:localhost,IP:127.0.0.1`).
    ///
    /// # Panics
    /// When openssl is missing or fails (a test set-up failure).
    pub fn make(san: &str) -> Certs {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pgsplit-certs-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("certificate directory");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let (key, crt) = (format!("{ca}.key"), format!("{ca}.crt"));
            let mut args = vec!["req", "-x509", "-days", "2", "-subj", "/CN=pgsplit test CA"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &crt]);
            openssl(&dir, &args);
        }
        let mut args = vec![
            "req",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ];
        args.extend(ec);
        openssl(&dir, &args);
        std::fs::write(dir.join("ext.cnf"), format!("subjectAltName={san}\n")).expect("ext.cnf");
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-out",
                "server.crt",
            ],
        );
        Certs { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.crt")
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// `--set` lines giving pgsplit this certificate for its clients.
    pub fn proxy_set(&self, mode: Option<&str>) -> Vec<String> {
        let mut set = vec![
            format!("tls.cert={}", self.cert().display()),
            format!("tls.key={}", self.key().display()),
        ];
        if let Some(m) = mode {
            set.push(format!("tls.mode={m}"));
        }
        set
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
