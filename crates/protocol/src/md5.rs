//! PostgreSQL's md5 password scheme: `"md5" + md5(md5(password + user) + salt)`.

use md5::{Digest, Md5};

fn hex(d: &[u8]) -> String {
    use std::fmt::Write;
    d.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The stored form: `"md5" + md5(password + user)`.
pub fn stored(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{}", hex(&h.finalize()))
}

/// What the client sends for `salt`, given the stored form.
pub fn response_from_stored(stored: &str, salt: [u8; 4]) -> String {
    let inner = stored.strip_prefix("md5").unwrap_or(stored);
    let mut h = Md5::new();
    h.update(inner.as_bytes());
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

/// Checks a client's md5 response in constant time over its length.
pub fn verify(stored: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let expect = response_from_stored(stored, salt);
    crate::scram::constant_time_eq(expect.as_bytes(), response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_postgres() {
        // Values computed independently: md5('secretapp'), then with salt 01020304.
        assert_eq!(
            stored("app", "secret"),
            "md56a422f785c9e20873908ce25d1736ae2"
        );
        let s = stored("app", "secret");
        let r = response_from_stored(&s, [1, 2, 3, 4]);
        assert_eq!(r, "md5911f527656472583a006e7727877b33e");
        assert!(verify(&s, [1, 2, 3, 4], r.as_bytes()));
        assert!(!verify(&s, [1, 2, 3, 5], r.as_bytes()));
    }
}
