//! Parsing one recipe file's text into the spanned [`Table`], in parallel pieces when the
//! file is long.
//!
//! A generated recipe of 10,000 stages is a megabyte of `[stages.<name>]` tables, and
//! parsing it (`toml`'s span-keeping parser, then the conversion to [`Table`], then freeing
//! the parser's tree) was half of a `pipeline plan`. Such a file is cut at lines that are
//! plain stage headers (`[stages.s0042]` at the start of a line); the pieces are parsed and
//! converted on rayon's threads, each with its spans shifted by the piece's offset, and the
//! stage tables are concatenated in file order.
//!
//! The result must be exactly what parsing the whole text gives, so the pieces are only
//! used when the cut cannot change the meaning, and otherwise (and on any syntax error,
//! so that errors are reported exactly as for the whole file) the whole text is parsed:
//!
//! - every piece must parse without error. A cut inside a multi-line string, array or
//!   inline table leaves the piece before it unterminated, which is an error, so a piece
//!   that parses ends where the whole file's parser is back at the top level;
//! - the text before the first cut (the *prefix*: `[experiment]`, `[vars]`...) must not
//!   define `stages` at all (an inline `stages = {..}` cannot be extended by headers);
//! - after the first cut, every line that opens with `[` must open with `[stages.`: then no
//!   piece can define another top-level table, a bare `[stages]` twice, or an array of
//!   tables, each of which would need the whole file to be checked;
//! - every later piece must hold exactly the top-level key `stages`, and no stage may be
//!   named by two pieces (a table defined twice, or a sub-table `[stages.a.x]` apart from
//!   its `[stages.a]`, which only the whole file's parser can judge).

use rayon::prelude::*;
use toml::de::DeTable;

use super::value::{Entry, Node, Table, V, from_de_table};

/// Files shorter than this are parsed whole: cutting and the thread hand-off cost more than
/// they save on a handwritten recipe.
const PARALLEL_MIN: usize = 128 * 1024;

/// Pieces per rayon thread: a few more than one, so a thread that is descheduled on a
/// loaded machine does not hold up the rest.
const PIECES_PER_THREAD: usize = 4;

/// Parse `text` (source `src`) into its spanned table, or the syntax errors of the whole
/// text (every one, as `toml`'s recovering parser finds them).
pub(crate) fn parse(src: u32, text: &str) -> Result<Table, Vec<toml::de::Error>> {
    if text.len() >= PARALLEL_MIN
        && let Some(table) = parse_pieces(src, text, pieces_wanted())
    {
        return Ok(table);
    }
    parse_whole(src, text)
}

fn pieces_wanted() -> usize {
    rayon::current_num_threads().max(1) * PIECES_PER_THREAD
}

/// The plain parse of the whole text.
pub(crate) fn parse_whole(src: u32, text: &str) -> Result<Table, Vec<toml::de::Error>> {
    let (table, errors) = DeTable::parse_recoverable(text);
    if errors.is_empty() {
        Ok(from_de_table(src, 0, table.get_ref()))
    } else {
        Err(errors)
    }
}

/// The parse of `text` cut into about `wanted` pieces, or `None` when the file cannot be
/// cut (too few stage headers, a line that rules cutting out) or a piece does not parse
/// cleanly on its own: then the caller parses the whole text.
pub(crate) fn parse_pieces(src: u32, text: &str, wanted: usize) -> Option<Table> {
    let cuts = cuts(text, wanted)?;
    // Piece 0 is the prefix, before the first stage header.
    let mut bounds = Vec::with_capacity(cuts.len() + 2);
    bounds.push(0);
    bounds.extend_from_slice(&cuts);
    bounds.push(text.len());
    let tables: Vec<Table> = bounds
        .par_windows(2)
        .map(|w| {
            let piece = &text[w[0]..w[1]];
            let (table, errors) = DeTable::parse_recoverable(piece);
            errors
                .is_empty()
                .then(|| from_de_table(src, w[0], table.get_ref()))
        })
        .collect::<Option<_>>()?;
    let mut tables = tables.into_iter();
    let mut top = tables.next()?;
    if top.get("stages").is_some() {
        return None;
    }
    let mut stages = Vec::new();
    let mut first: Option<(crate::recipe::value::Loc, crate::recipe::value::Loc)> = None;
    for t in tables {
        let mut entries = t.into_entries().into_iter();
        let (Some(e), None) = (entries.next(), entries.next()) else {
            return None;
        };
        if e.key != "stages" {
            return None;
        }
        first.get_or_insert((e.key_loc, e.val.loc));
        let V::Table(piece) = e.val.v else {
            return None;
        };
        stages.extend(piece.into_entries());
    }
    // A stage named by two pieces: only the whole file's parser can judge it.
    let stages = Table::from_distinct(stages).ok()?;
    let (key_loc, loc) = first?;
    top.insert(Entry {
        key: "stages".to_string(),
        key_loc,
        val: Node {
            loc,
            v: V::Table(stages),
        },
    });
    Some(top)
}

/// Byte offsets where pieces start: line starts of plain stage headers, spread evenly over
/// the text, the first one being the first stage header. `None` if the text cannot be cut.
fn cuts(text: &str, wanted: usize) -> Option<Vec<usize>> {
    let mut headers = Vec::new();
    let mut start = 0;
    while start < text.len() {
        // `find` on a char is a fast (word-at-a-time) search; lines are short.
        let end = text[start..]
            .find('\n')
            .map_or(text.len(), |i| start + i + 1);
        let line = &text[start..end];
        let at = start;
        start = end;
        // TOML's whitespace is spaces and tabs; most lines are `key = value`.
        let trimmed = line.trim_start_matches([' ', '\t']);
        if !trimmed.starts_with('[') {
            continue;
        }
        if is_plain_stage_header(line) {
            headers.push(at);
        } else if !headers.is_empty() && !trimmed.starts_with("[stages.") {
            return None;
        }
    }
    let first = *headers.first()?;
    if wanted < 2 || headers.len() < 2 {
        return None;
    }
    // Aim at `wanted` equal spans of the text after the prefix; each cut is the first
    // header at or after its aim.
    let span = text.len() - first;
    let mut out = vec![first];
    let mut h = 0;
    for k in 1..wanted {
        let aim = first + span * k / wanted;
        while h < headers.len() && headers[h] < aim {
            h += 1;
        }
        match headers.get(h) {
            Some(&at) if at > *out.last()? => out.push(at),
            Some(_) => {}
            None => break,
        }
    }
    (out.len() >= 2).then_some(out)
}

/// `[stages.<name>]` at the very start of a line, `<name>` a bare key, anything (a comment)
/// after the `]`.
fn is_plain_stage_header(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("[stages.") else {
        return false;
    };
    let Some(end) = rest.find(']') else {
        return false;
    };
    let name = &rest[..end];
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::{parse_pieces, parse_whole};
    use crate::recipe::value::{Node, Table, V};

    /// Everything of a table that the recipe uses (keys, values, every span), in order.
    fn dump(t: &Table, out: &mut String) {
        for e in t.iter() {
            let _ = write!(out, "{}@{:?}=", e.key, e.key_loc);
            dump_node(&e.val, out);
            out.push(';');
        }
    }

    fn dump_node(n: &Node, out: &mut String) {
        let _ = write!(out, "{:?}:", n.loc);
        match &n.v {
            V::Table(t) => {
                out.push('{');
                dump(t, out);
                out.push('}');
            }
            V::Array(items) => {
                out.push('[');
                for i in items {
                    dump_node(i, out);
                    out.push(',');
                }
                out.push(']');
            }
            other => {
                let _ = write!(out, "{other:?}");
            }
        }
    }

    fn dumped(t: &Table) -> String {
        let mut s = String::new();
        dump(t, &mut s);
        s
    }

    fn recipe(n: usize) -> String {
        let mut s = String::from("[experiment]\nname = \"x\"\n\n[vars]\nv = [1, 2]\n\n");
        for i in 0..n {
            let deps = if i == 0 {
                "\"seed.txt\"".to_string()
            } else {
                format!("\"@s{:03}\"", i - 1)
            };
            let _ = write!(
                s,
                "[stages.s{i:03}] # stage {i}\nkind = \"shell\"\ndeps = [{deps}]\n\
                 cmd = \"\"\"\ncat ${{deps}}\n\"\"\"\nouts = [\"out/{i}.txt\"]\n\
                 params = {{ p = {i}, q = 1.5 }}\n\n[stages.s{i:03}.resources]\ncpus = 1\n\n"
            );
        }
        s
    }

    #[test]
    fn pieces_give_exactly_the_whole_parse() {
        let text = recipe(40);
        let whole = parse_whole(3, &text).expect("valid");
        for wanted in [2, 3, 7, 40, 100] {
            let pieces = parse_pieces(3, &text, wanted).expect("this text can be cut");
            assert_eq!(dumped(&pieces), dumped(&whole), "{wanted} pieces");
        }
    }

    /// Texts that the pieces would misread, or that are errors only as a whole: each falls
    /// back to the whole parse (`None`), and `parse` agrees with `parse_whole`.
    #[test]
    fn cuts_that_could_change_the_meaning_fall_back() {
        let base = recipe(6);
        let cases = [
            // A stage defined twice (an error in the whole file).
            format!("{base}[stages.s001]\nkind = \"x\"\n"),
            // A sub-table apart from its stage.
            format!("{base}[stages.s009]\nkind = \"x\"\n[stages.s002.more]\na = 1\n"),
            // Another top-level table after the stages.
            format!("{base}[vars2]\na = 1\n"),
            // A bare `[stages]` header, twice.
            format!("{base}[stages]\n[stages.s100]\nkind = \"x\"\n[stages]\n"),
            // Arrays of tables.
            format!("{base}[[stages.arr]]\na = 1\n[stages.s200]\nkind = \"x\"\n[[stages.arr]]\n"),
            // A stage header inside a multi-line string.
            format!(
                "{base}[stages.t]\ncmd = \"\"\"\n[stages.u]\n\"\"\"\n[stages.v]\nkind = \"x\"\n"
            ),
            // `stages` inline in the prefix: headers may not extend it.
            format!("stages = {{ a = {{ kind = \"x\" }} }}\n{base}"),
            // A syntax error in one piece.
            format!("{base}[stages.w]\nkind = = 1\n"),
        ];
        for (i, text) in cases.iter().enumerate() {
            let whole = parse_whole(1, text);
            // With as many pieces wanted as bytes, every stage header is a cut: the worst
            // case, which must be recognised.
            assert!(
                parse_pieces(1, text, text.len()).is_none(),
                "case {i} cut at every header must fall back"
            );
            // Coarser cuts may keep the troublesome lines in one piece; then the pieces must
            // read exactly like the whole text.
            for wanted in [2, 3, 5] {
                if let Some(p) = parse_pieces(1, text, wanted) {
                    let w = whole.as_ref().expect("pieces only parse a valid text");
                    assert_eq!(dumped(&p), dumped(w), "case {i} in {wanted} pieces");
                }
            }
            let got = super::parse(1, text);
            match (&whole, &got) {
                (Ok(w), Ok(g)) => assert_eq!(dumped(g), dumped(w), "case {i}"),
                (Err(w), Err(g)) => {
                    let msgs = |e: &[toml::de::Error]| {
                        e.iter()
                            .map(|e| (e.span(), e.message().to_string()))
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(msgs(g), msgs(w), "case {i}");
                }
                _ => panic!("case {i}: parse and parse_whole disagree on validity"),
            }
        }
    }

    #[test]
    fn short_or_headerless_texts_are_not_cut() {
        assert!(parse_pieces(0, "[experiment]\nname = \"x\"\n", 4).is_none());
        assert!(parse_pieces(0, "[stages.a]\nkind = \"x\"\n", 4).is_none());
        let text = recipe(3);
        assert!(parse_pieces(0, &text, 1).is_none());
    }
}
