//! The canonical, versioned byte encoding that keys are hashed over.
//!
//! `std::hash::Hash` is neither stable across Rust releases nor defined for floats, and
//! `serde_json` output depends on map insertion order (the workspace enables
//! `preserve_order`), so keys are computed through [`StableHash`] instead:
//!
//! - every value starts with a one-byte type tag, so `"1"`, `1` and `1.0` never collide;
//! - strings, byte strings and sequences carry an explicit little-endian `u64` length prefix,
//!   so `["ab", "c"]` and `["a", "bc"]` encode differently;
//! - maps are encoded with their keys sorted bytewise, whatever order they were built in;
//! - floats are encoded as their IEEE-754 bits with `-0.0` folded into `0.0` and every NaN
//!   folded into one quiet NaN, so equal numbers always hash equal.
//!
//! Changing this encoding changes every key: bump [`super::KEY_SCHEMA`] in the same change.

use std::collections::BTreeMap;

/// Type tags; never reuse or renumber one (that would silently alias old keys).
mod tag {
    pub(super) const NULL: u8 = 0;
    pub(super) const FALSE: u8 = 1;
    pub(super) const TRUE: u8 = 2;
    pub(super) const INT: u8 = 3;
    pub(super) const UINT: u8 = 4;
    pub(super) const FLOAT: u8 = 5;
    pub(super) const STR: u8 = 6;
    pub(super) const SEQ: u8 = 7;
    pub(super) const MAP: u8 = 8;
    pub(super) const BYTES: u8 = 9;
    pub(super) const NONE: u8 = 10;
    pub(super) const SOME: u8 = 11;
}

/// A blake3 hasher fed through the canonical encoding.
///
/// The encoding is built in a buffer and handed to blake3 in large pieces: a key's encoding
/// is dozens of writes of a few bytes each, and each `blake3::Hasher::update` call has a
/// fixed cost that dominated key computation (a no-op rerun computes one key per stage).
/// blake3 hashes a byte stream the same however it is split, so keys do not change.
#[derive(Debug, Clone)]
pub struct StableHasher {
    inner: blake3::Hasher,
    buf: Vec<u8>,
}

/// Buffered bytes are hashed once the buffer holds this many (and at the end).
const FLUSH_AT: usize = 16 * 1024;

impl StableHasher {
    /// A hasher in the `domain` (a fixed, versioned context string), so that a key can never
    /// equal a digest computed for another purpose.
    #[must_use]
    pub fn new(domain: &str) -> Self {
        Self {
            inner: blake3::Hasher::new_derive_key(domain),
            buf: Vec::with_capacity(1024),
        }
    }

    /// A hasher continuing `inner` (a blake3 hasher in derive-key mode, typically a clone of
    /// one made once: deriving the context key is a blake3 compression of its own, about a
    /// fifth of hashing a small key).
    #[must_use]
    pub fn with(inner: blake3::Hasher) -> Self {
        Self {
            inner,
            buf: Vec::with_capacity(1024),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= FLUSH_AT {
            self.inner.update(&self.buf);
            self.buf.clear();
        }
    }

    /// Feed a length prefix.
    pub fn write_len(&mut self, len: usize) {
        self.update(&(len as u64).to_le_bytes());
    }

    /// Feed a type tag.
    pub fn write_tag(&mut self, tag: u8) {
        self.update(&[tag]);
    }

    /// Feed a string (tagged, length-prefixed).
    pub fn write_str(&mut self, s: &str) {
        self.write_tag(tag::STR);
        self.write_len(s.len());
        self.update(s.as_bytes());
    }

    /// Feed a byte string (tagged, length-prefixed).
    pub fn write_bytes(&mut self, b: &[u8]) {
        self.write_tag(tag::BYTES);
        self.write_len(b.len());
        self.update(b);
    }

    /// Feed a signed integer.
    pub fn write_i64(&mut self, v: i64) {
        self.write_tag(tag::INT);
        self.update(&v.to_le_bytes());
    }

    /// Feed an unsigned integer. Values that fit an `i64` are encoded as one, so that the
    /// same number hashes the same whether it was parsed as signed or unsigned.
    pub fn write_u64(&mut self, v: u64) {
        match i64::try_from(v) {
            Ok(i) => self.write_i64(i),
            Err(_) => {
                self.write_tag(tag::UINT);
                self.update(&v.to_le_bytes());
            }
        }
    }

    /// Feed a float in the fixed encoding described in the module docs.
    pub fn write_f64(&mut self, v: f64) {
        let canonical = if v == 0.0 {
            0.0f64
        } else if v.is_nan() {
            f64::NAN
        } else {
            v
        };
        self.write_tag(tag::FLOAT);
        self.update(&canonical.to_bits().to_le_bytes());
    }

    /// Feed a boolean.
    pub fn write_bool(&mut self, v: bool) {
        self.write_tag(if v { tag::TRUE } else { tag::FALSE });
    }

    /// Feed anything implementing [`StableHash`].
    pub fn write<T: StableHash + ?Sized>(&mut self, v: &T) {
        v.stable_hash(self);
    }

    /// The 32-byte blake3 output.
    #[must_use]
    pub fn finish(&self) -> [u8; 32] {
        if self.buf.is_empty() {
            return *self.inner.finalize().as_bytes();
        }
        let mut inner = self.inner.clone();
        inner.update(&self.buf);
        *inner.finalize().as_bytes()
    }

    /// [`StableHasher::finish`], consuming the hasher: no copy of blake3's state (which
    /// `finish` must make to stay usable), for the one-shot keys.
    #[must_use]
    pub fn into_digest(mut self) -> [u8; 32] {
        self.inner.update(&self.buf);
        *self.inner.finalize().as_bytes()
    }
}

/// A value with a canonical encoding (see the module docs).
pub trait StableHash {
    /// Feed `self` into the hasher.
    fn stable_hash(&self, h: &mut StableHasher);
}

impl StableHash for str {
    fn stable_hash(&self, h: &mut StableHasher) {
        h.write_str(self);
    }
}

impl StableHash for String {
    fn stable_hash(&self, h: &mut StableHasher) {
        h.write_str(self);
    }
}

impl StableHash for bool {
    fn stable_hash(&self, h: &mut StableHasher) {
        h.write_bool(*self);
    }
}

impl StableHash for u32 {
    fn stable_hash(&self, h: &mut StableHasher) {
        h.write_u64(u64::from(*self));
    }
}

impl StableHash for u64 {
    fn stable_hash(&self, h: &mut StableHasher) {
        h.write_u64(*self);
    }
}

impl StableHash for usize {
    fn stable_hash(&self, h: &mut StableHasher) {
        h.write_u64(*self as u64);
    }
}

impl StableHash for i64 {
    fn stable_hash(&self, h: &mut StableHasher) {
        h.write_i64(*self);
    }
}

impl StableHash for f64 {
    fn stable_hash(&self, h: &mut StableHasher) {
        h.write_f64(*self);
    }
}

impl StableHash for [u8; 32] {
    fn stable_hash(&self, h: &mut StableHasher) {
        h.write_bytes(self);
    }
}

impl<T: StableHash + ?Sized> StableHash for &T {
    fn stable_hash(&self, h: &mut StableHasher) {
        (**self).stable_hash(h);
    }
}

impl<T: StableHash> StableHash for Option<T> {
    fn stable_hash(&self, h: &mut StableHasher) {
        match self {
            None => h.write_tag(tag::NONE),
            Some(v) => {
                h.write_tag(tag::SOME);
                v.stable_hash(h);
            }
        }
    }
}

impl<T: StableHash> StableHash for [T] {
    fn stable_hash(&self, h: &mut StableHasher) {
        h.write_tag(tag::SEQ);
        h.write_len(self.len());
        for v in self {
            v.stable_hash(h);
        }
    }
}

impl<T: StableHash> StableHash for Vec<T> {
    fn stable_hash(&self, h: &mut StableHasher) {
        self.as_slice().stable_hash(h);
    }
}

impl<K: StableHash, V: StableHash> StableHash for BTreeMap<K, V> {
    fn stable_hash(&self, h: &mut StableHasher) {
        h.write_tag(tag::MAP);
        h.write_len(self.len());
        for (k, v) in self {
            k.stable_hash(h);
            v.stable_hash(h);
        }
    }
}

impl StableHash for serde_json::Value {
    fn stable_hash(&self, h: &mut StableHasher) {
        use serde_json::Value;
        match self {
            Value::Null => h.write_tag(tag::NULL),
            Value::Bool(b) => h.write_bool(*b),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    h.write_i64(i);
                } else if let Some(u) = n.as_u64() {
                    h.write_u64(u);
                } else {
                    // serde_json numbers are always one of i64/u64/f64.
                    h.write_f64(n.as_f64().unwrap_or(f64::NAN));
                }
            }
            Value::String(s) => h.write_str(s),
            Value::Array(items) => items.as_slice().stable_hash(h),
            Value::Object(map) => write_map(h, map, |h, _, v| v.stable_hash(h)),
        }
    }
}

/// A JSON object in the canonical map encoding, each value fed by `value(h, key, value)`.
pub(crate) fn write_map(
    h: &mut StableHasher,
    map: &serde_json::Map<String, serde_json::Value>,
    mut value: impl FnMut(&mut StableHasher, &str, &serde_json::Value),
) {
    // The map keeps insertion order; the encoding must not.
    let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    h.write_tag(tag::MAP);
    h.write_len(entries.len());
    for (k, v) in entries {
        h.write_str(k);
        value(h, k, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn digest<T: StableHash + ?Sized>(v: &T) -> [u8; 32] {
        let mut h = StableHasher::new("pipeline test");
        h.write(v);
        h.finish()
    }

    /// Buffering must not change a digest: the bytes hashed are the encoding, whether they
    /// reach blake3 at the end or in flushes along the way (more than `FLUSH_AT` here).
    #[test]
    fn buffered_encoding_hashes_like_the_plain_stream() {
        let long = "x".repeat(FLUSH_AT + 123);
        let mut h = StableHasher::new("pipeline test");
        h.write("ab");
        h.write(long.as_str());
        h.write(&7u32);
        let mut plain = blake3::Hasher::new_derive_key("pipeline test");
        for s in ["ab", long.as_str()] {
            plain.update(&[tag::STR]);
            plain.update(&(s.len() as u64).to_le_bytes());
            plain.update(s.as_bytes());
        }
        plain.update(&[tag::INT]);
        plain.update(&7i64.to_le_bytes());
        assert_eq!(h.finish(), *plain.finalize().as_bytes());
        // `finish` leaves the hasher usable and gives the same answer twice.
        assert_eq!(h.finish(), *plain.finalize().as_bytes());
        assert_eq!(h.into_digest(), *plain.finalize().as_bytes());
    }

    #[test]
    fn map_order_does_not_matter() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"a":1,"b":{"x":true,"y":[1,2]}}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"b":{"y":[1,2],"x":true},"a":1}"#).unwrap();
        assert_eq!(digest(&a), digest(&b));
    }

    #[test]
    fn types_and_boundaries_do_not_collide() {
        assert_ne!(digest(&json!("1")), digest(&json!(1)));
        assert_ne!(digest(&json!(1)), digest(&json!(1.0)));
        assert_ne!(digest(&json!(["ab", "c"])), digest(&json!(["a", "bc"])));
        assert_ne!(digest(&json!({"a": "b"})), digest(&json!({"ab": ""})));
        assert_ne!(digest(&json!(null)), digest(&json!(false)));
        assert_ne!(digest(&Some(0u64)), digest(&None::<u64>));
    }

    #[test]
    fn float_encoding_is_fixed() {
        assert_eq!(digest(&0.0f64), digest(&-0.0f64));
        assert_eq!(digest(&f64::NAN), digest(&(-f64::NAN)));
        assert_ne!(digest(&2e-4f64), digest(&1e-4f64));
        // Unsigned and signed spellings of one integer agree.
        assert_eq!(digest(&5u64), digest(&5i64));
    }

    #[test]
    fn domain_separates() {
        let mut a = StableHasher::new("pipeline a");
        let mut b = StableHasher::new("pipeline b");
        a.write("x");
        b.write("x");
        assert_ne!(a.finish(), b.finish());
    }

    proptest::proptest! {
        /// Any permutation of an object's keys hashes the same; any change of a value does not.
        #[test]
        fn permutations_agree_and_edits_differ(
            entries in proptest::collection::btree_map("[a-z]{1,6}", -1000i64..1000, 1..12),
            seed in 0usize..1000,
        ) {
            let forward: serde_json::Map<String, serde_json::Value> =
                entries.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            let mut pairs: Vec<(&String, &i64)> = entries.iter().collect();
            let n = pairs.len();
            pairs.rotate_left(seed % n);
            pairs.reverse();
            let shuffled: serde_json::Map<String, serde_json::Value> =
                pairs.iter().map(|(k, v)| ((*k).clone(), json!(v))).collect();
            let a = serde_json::Value::Object(forward);
            proptest::prop_assert_eq!(digest(&a), digest(&serde_json::Value::Object(shuffled)));
            let mut edited = a.clone();
            let first = entries.keys().next().cloned().unwrap_or_default();
            edited[&first] = json!(entries[&first] + 1);
            proptest::prop_assert_ne!(digest(&a), digest(&edited));
        }
    }

    /// The encoding is part of the on-disk format: a change here invalidates every cache.
    /// If this test fails, bump `KEY_SCHEMA` and update the expected value.
    #[test]
    fn encoding_is_stable() {
        let v = json!({"lr": 2e-4, "steps": 100, "name": "gqa", "tags": ["a", null, true]});
        let hex: String = digest(&v).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "0ad5e8c25b976d55c62153dbe00719dbcd4789523f0077e15eb596dc224723ec"
        );
    }
}
