//! The recipe's own spanned value tree.
//!
//! `toml`'s `DeValue` borrows from one input string and carries byte spans into it. A recipe
//! is assembled from several texts (the file, the files it `extends` or `include`s, and the
//! `--set` command line), so every value here carries a [`Loc`]: which source it came from
//! and where. Merging and overriding then move values between documents without losing the
//! place an error must point at.
//!
//! Tables keep insertion order (stage declaration order is the tie-breaker of the
//! topological order) and a name index, because the `stages` table of a generated recipe
//! can hold 10,000 entries and merges look names up.

use foldhash::{HashMap, HashMapExt};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// A place in one of the recipe's sources: source id plus a byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Loc {
    pub src: u32,
    pub start: u32,
    pub end: u32,
}

impl Loc {
    pub(crate) fn new(src: u32, range: std::ops::Range<usize>) -> Self {
        let clamp = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        Self {
            src,
            start: clamp(range.start),
            end: clamp(range.end.max(range.start)),
        }
    }

    /// The same place shifted by `offset` bytes (values parsed out of a larger text).
    pub(crate) fn shifted(self, offset: usize) -> Self {
        let off = u32::try_from(offset).unwrap_or(u32::MAX);
        Self {
            src: self.src,
            start: self.start.saturating_add(off),
            end: self.end.saturating_add(off),
        }
    }
}

/// A value with the place it was written.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub loc: Loc,
    pub v: V,
}

/// The TOML value kinds. Datetimes are kept as their text: no parameter type accepts them,
/// but a free-form `Table` parameter may carry one.
#[derive(Debug, Clone)]
pub(crate) enum V {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    OutOfRange,
    Array(Vec<Node>),
    Table(Table),
}

impl V {
    /// The TOML name of the value's type, for "expected X, got Y" messages.
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            V::Str(_) => "a string",
            V::Int(_) => "an integer",
            V::Float(_) => "a float",
            V::Bool(_) => "a boolean",
            V::Datetime(_) => "a datetime",
            V::OutOfRange => "an out-of-range number",
            V::Array(_) => "an array",
            V::Table(_) => "a table",
        }
    }
}

/// One `key = value` of a table, with the key's own place.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub key_loc: Loc,
    pub val: Node,
}

/// An ordered table. Lookups scan small tables and use a name index once a table grows
/// (the `stages` table of a generated recipe can hold 10,000 entries, while each stage's own
/// table has a handful, and an index per stage would cost more than it saves).
#[derive(Debug, Clone, Default)]
pub(crate) struct Table {
    entries: Vec<Entry>,
    index: Option<HashMap<String, usize>>,
}

/// Tables up to this size are scanned.
const SCAN: usize = 16;

impl Table {
    fn position(&self, key: &str) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(key).copied(),
            None => self.entries.iter().position(|e| e.key == key),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Entry> {
        self.position(key).map(|i| &self.entries[i])
    }

    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut Entry> {
        self.position(key).map(|i| &mut self.entries[i])
    }

    /// A table of entries whose keys are known to be distinct (a parsed TOML table): no
    /// lookups while building. `Err` gives the entries back if two keys are equal after all.
    pub(crate) fn from_distinct(entries: Vec<Entry>) -> Result<Self, Vec<Entry>> {
        if entries.len() <= SCAN {
            // Small tables are scanned on lookup; a parser's tables have distinct keys, so
            // only callers merging several tables can trip this check.
            for (i, e) in entries.iter().enumerate() {
                if entries[..i].iter().any(|o| o.key == e.key) {
                    return Err(entries);
                }
            }
            return Ok(Self {
                entries,
                index: None,
            });
        }
        let mut index = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if index.insert(e.key.clone(), i).is_some() {
                return Err(entries);
            }
        }
        Ok(Self {
            entries,
            index: Some(index),
        })
    }

    /// Insert or replace (a replaced entry keeps its position: overriding a stage in a child
    /// recipe must not reorder the stages).
    pub(crate) fn insert(&mut self, entry: Entry) {
        if let Some(i) = self.position(&entry.key) {
            self.entries[i] = entry;
            return;
        }
        if let Some(index) = &mut self.index {
            index.insert(entry.key.clone(), self.entries.len());
        }
        self.entries.push(entry);
        if self.index.is_none() && self.entries.len() > SCAN {
            self.index = Some(
                self.entries
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (e.key.clone(), i))
                    .collect(),
            );
        }
    }

    /// Remove a key, keeping the order of the others.
    pub(crate) fn remove(&mut self, key: &str) -> Option<Entry> {
        let i = self.position(key)?;
        let e = self.entries.remove(i);
        if let Some(index) = &mut self.index {
            index.remove(key);
            for j in index.values_mut() {
                if *j > i {
                    *j -= 1;
                }
            }
        }
        Some(e)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.key.as_str())
    }

    pub(crate) fn into_entries(self) -> Vec<Entry> {
        self.entries
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Convert a parsed TOML table (spans relative to `offset` within source `src`).
pub(crate) fn from_de_table(src: u32, offset: usize, t: &DeTable<'_>) -> Table {
    let entries: Vec<Entry> = t
        .iter()
        .map(|(k, v)| Entry {
            key: k.get_ref().to_string(),
            key_loc: Loc::new(src, k.span()).shifted(offset),
            val: from_de_value(src, offset, v),
        })
        .collect();
    // The parser rejects a key defined twice, so the keys are distinct; should that ever
    // not hold, inserting one by one keeps the last value, as before.
    Table::from_distinct(entries).unwrap_or_else(|entries| {
        let mut out = Table::default();
        for e in entries {
            out.insert(e);
        }
        out
    })
}

/// Convert a parsed TOML value.
pub(crate) fn from_de_value(src: u32, offset: usize, v: &Spanned<DeValue<'_>>) -> Node {
    let loc = Loc::new(src, v.span()).shifted(offset);
    let v = match v.get_ref() {
        DeValue::String(s) => V::Str(s.to_string()),
        // The parser has checked the digits, so only an integer beyond i64 fails here; it is
        // kept as a value no parameter type accepts, so the type check names it.
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => V::Int(n),
            Err(_) => V::OutOfRange,
        },
        DeValue::Float(f) => match f.as_str().replace('_', "").parse::<f64>() {
            Ok(x) => V::Float(x),
            Err(_) => V::OutOfRange,
        },
        DeValue::Boolean(b) => V::Bool(*b),
        DeValue::Datetime(d) => V::Datetime(d.to_string()),
        DeValue::Array(a) => V::Array(a.iter().map(|x| from_de_value(src, offset, x)).collect()),
        DeValue::Table(t) => V::Table(from_de_table(src, offset, t)),
    };
    Node { loc, v }
}

/// A scalar rendered as the text used in expansion names and `{item}` substitution.
/// Floats use [`float_text`], so `1e-4` names a stage `lr=0.0001` and `2500.0` `lam=2500`.
pub(crate) fn scalar_text(v: &V) -> Option<String> {
    match v {
        V::Str(s) => Some(s.clone()),
        V::Int(i) => Some(i.to_string()),
        V::Float(f) => Some(float_text(*f)),
        V::Bool(b) => Some(b.to_string()),
        V::Datetime(_) | V::OutOfRange | V::Array(_) | V::Table(_) => None,
    }
}

/// The shortest text that reads back as `f`: plain decimals from 1e-4 up to 1e16
/// (`0.0001`, `0.5`, `2500`), exponent form outside (`1e-5`, `1.5e-7`, `1e16`), never a
/// trailing `.0` and never `-0`. Stage names must be stable (they name run directories) and
/// readable; `Display` alone would spell `1e300` with 301 digits.
pub(crate) fn float_text(f: f64) -> String {
    if f == 0.0 {
        return "0".to_string();
    }
    // `Debug` is the shortest round-trip form and switches to an exponent outside
    // [1e-4, 1e16); it marks integral values with `.0`, which a name does not need.
    let mut s = format!("{f:?}");
    if s.ends_with(".0") {
        s.truncate(s.len() - 2);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::float_text;

    #[test]
    fn floats_render_short_and_stable() {
        let cases = [
            (2500.0, "2500"),
            (0.0, "0"),
            (-0.0, "0"),
            (1e-4, "0.0001"),
            (2e-4, "0.0002"),
            (0.5, "0.5"),
            (-2.5, "-2.5"),
            (1e-5, "1e-5"),
            (1.5e-7, "1.5e-7"),
            (1e16, "1e16"),
            (1e300, "1e300"),
            (123_456.789, "123456.789"),
        ];
        for (f, want) in cases {
            assert_eq!(float_text(f), want, "{f:?}");
            assert_eq!(want.parse::<f64>().ok(), Some(f), "{want} reads back");
        }
    }
}
