//! API keys: the config holds only SHA-256 hashes; a presented key is hashed and compared with
//! every configured hash in constant time (no early exit, so timing tells nothing).

use aws_lc_rs::digest;

/// One configured key.
#[derive(Debug)]
pub struct ApiKey {
    /// Principal id.
    pub id: std::sync::Arc<str>,
    hash: [u8; 32],
    /// Roles of the key.
    pub roles: super::roles::RoleSet,
}

/// All keys of a snapshot.
#[derive(Debug, Default)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

/// Lower-case hex SHA-256 of `key` (what `b25-gateway hash-key` prints).
pub fn hash_hex(key: &str) -> String {
    let d = digest::digest(&digest::SHA256, key.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a 64-character hex SHA-256.
pub fn parse_hash(hex: &str) -> Result<[u8; 32], String> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("must be the 64-character hex SHA-256 of the key (see `b25-gateway hash-key`)".into());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

impl ApiKeys {
    /// Adds a key.
    pub fn push(&mut self, id: &str, sha256_hex: &str, roles: super::roles::RoleSet) -> Result<(), String> {
        self.keys.push(ApiKey { id: id.into(), hash: parse_hash(sha256_hex)?, roles });
        Ok(())
    }

    /// The key matching `presented`, compared against every key in constant time.
    pub fn find(&self, presented: &[u8]) -> Option<&ApiKey> {
        let d = digest::digest(&digest::SHA256, presented);
        let mut found = None;
        for k in &self.keys {
            if aws_lc_rs::constant_time::verify_slices_are_equal(d.as_ref(), &k.hash).is_ok() && found.is_none() {
                found = Some(k);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_find() {
        let h = hash_hex("secret-key");
        assert_eq!(h.len(), 64);
        let mut keys = ApiKeys::default();
        keys.push("bot", &h, super::super::roles::RoleSet(1)).unwrap();
        assert_eq!(&*keys.find(b"secret-key").unwrap().id, "bot");
        assert!(keys.find(b"secret-kez").is_none());
        assert!(keys.push("x", "nothex", super::super::roles::RoleSet(1)).is_err());
    }
}
