//! [`Digest`]: a 32-byte blake3 digest, the one hash type of the store.
//!
//! It displays as 12 hex characters (enough to tell entries apart in logs and `plan`
//! output), formats in full with `{:#}` or [`Digest::to_hex`], and serializes as the full
//! 64-character lower-case hex string in human-readable formats (JSON: key records, events,
//! `--json`), and as its 32 raw bytes in binary ones (the MessagePack manifests), where
//! decoding hex was a measurable part of every manifest read.

use std::fmt;
use std::str::FromStr;

/// A blake3 digest of content (a file, a tree) or of a canonical key encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

/// A stage key. The engine computes it (blake3 over its canonical key encoding); the store
/// only uses it as a name, so it is the same type as a content digest.
pub type Key = Digest;

/// Number of hex characters shown by `Display`.
const SHORT_HEX: usize = 12;

impl Digest {
    /// Hashes a byte slice.
    ///
    /// ```
    /// let d = cache::Digest::of_bytes(b"abc");
    /// assert_eq!(d.to_hex().len(), 64);
    /// assert_eq!(d.to_string().len(), 12);
    /// ```
    #[must_use]
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// The full 64-character lower-case hex form.
    #[must_use]
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// The full hex form without a heap allocation (for building paths).
    #[must_use]
    pub fn hex(&self) -> impl std::ops::Deref<Target = str> {
        blake3::Hash::from_bytes(self.0).to_hex()
    }

    /// The raw bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl fmt::Display for Digest {
    /// Short hex by default; the full hex with the alternate flag (`{:#}`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.to_hex();
        if f.alternate() {
            f.write_str(&hex)
        } else {
            f.write_str(&hex[..SHORT_HEX])
        }
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self)
    }
}

/// A string that is not 64 hex characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a 64-character hex digest")]
pub struct ParseDigestError(pub String);

impl FromStr for Digest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_hex(s.as_bytes())
            .map(Digest)
            .ok_or_else(|| ParseDigestError(s.to_owned()))
    }
}

/// Hex digit values, `0xff` for bytes that are not hex digits (either case).
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// 64 hex digits (either case) as 32 bytes. Every manifest read decodes several digests,
/// so this is a table lookup per digit rather than a general-purpose decoder.
fn decode_hex(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let (hi, lo) = (HEX_VALUE[pair[0] as usize], HEX_VALUE[pair[1] as usize]);
        // Valid digits are < 16: any 0xff sets the high bits.
        bad |= hi | lo;
        *o = (hi << 4) | (lo & 0x0f);
    }
    (bad < 16).then_some(out)
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.hex())
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Hex text, or (binary formats) the 32 bytes.
        struct DigestVisitor;
        impl serde::de::Visitor<'_> for DigestVisitor {
            type Value = Digest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 64-character hex digest or 32 bytes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Digest, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Digest, E> {
                v.try_into()
                    .map(Digest)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        if d.is_human_readable() {
            d.deserialize_str(DigestVisitor)
        } else {
            d.deserialize_bytes(DigestVisitor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_short_display() {
        let d = Digest::of_bytes(b"hello");
        let hex = d.to_hex();
        assert_eq!(hex, blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(hex.parse::<Digest>().unwrap(), d);
        assert_eq!(format!("{d}"), hex[..12]);
        assert_eq!(format!("{d:#}"), hex);
    }

    #[test]
    fn serde_is_full_hex_string() {
        let d = Digest::of_bytes(b"x");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{}\"", d.to_hex()));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"abc\"").is_err());
        assert!("zz".parse::<Digest>().is_err());
        // Upper case is accepted (as blake3's own parser does); anything else is not.
        let hex = d.to_hex();
        assert_eq!(hex.to_uppercase().parse::<Digest>().unwrap(), d);
        let mut bad = hex.clone();
        bad.replace_range(63.., "g");
        assert!(bad.parse::<Digest>().is_err());
        assert!(format!("{hex}0").parse::<Digest>().is_err());
    }

    #[test]
    fn binary_serde_is_32_bytes() {
        let d = Digest::of_bytes(b"x");
        let bytes = rmp_serde::to_vec(&d).unwrap();
        // MessagePack bin 8: marker, length, the bytes.
        assert_eq!(bytes.len(), 34);
        assert_eq!(&bytes[2..], d.as_bytes());
        assert_eq!(rmp_serde::from_slice::<Digest>(&bytes).unwrap(), d);
        let short = rmp_serde::to_vec(&serde_bytes_of(&[1u8; 31])).unwrap();
        assert!(rmp_serde::from_slice::<Digest>(&short).is_err());
    }

    /// 31 bytes serialized as MessagePack `bin` (what a truncated digest would be).
    fn serde_bytes_of(b: &[u8]) -> impl serde::Serialize + '_ {
        struct B<'a>(&'a [u8]);
        impl serde::Serialize for B<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        B(b)
    }
}
