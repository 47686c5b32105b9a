//! sha256 digests: their syntax, computing them, and checking content against the digest
//! that names it.

use super::ImageError;

/// The hex part of a `sha256:<hex>` digest, or [`ImageError::BadDigest`].
pub(crate) fn sha256_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(hex)
        }
        _ => Err(ImageError::BadDigest(digest.to_string())),
    }
}

/// `sha256:<hex>` of a finished hasher.
pub(crate) fn digest_string(hasher: sha2::Sha256) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// `sha256:<hex>` of some bytes.
pub(crate) fn sha256_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    digest_string(sha2::Sha256::new_with_prefix(bytes))
}

/// Checks that `bytes` hash to `expected`.
pub(crate) fn check_digest(bytes: &[u8], expected: &str, what: &str) -> Result<(), ImageError> {
    let actual = sha256_of(bytes);
    if actual != expected {
        return Err(ImageError::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_syntax() {
        let good = format!("sha256:{}", "a1".repeat(32));
        assert_eq!(sha256_hex(&good).expect("valid digest"), "a1".repeat(32));
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", "A1".repeat(32)),
            format!("sha512:{}", "a1".repeat(32)),
            format!("sha256:{}", "a1".repeat(31)),
            format!("sha256:../{}", "a1".repeat(31)),
            "a1".repeat(32),
        ] {
            assert!(
                matches!(sha256_hex(&bad), Err(ImageError::BadDigest(_))),
                "{bad}"
            );
        }
        assert_eq!(
            sha256_of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
