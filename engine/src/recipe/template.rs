//! Text templates in recipe strings: `{name}` substitution and `*` patterns.
//!
//! Only names the expansion defines (`{item}`, `{index}`, `{<dim>}`) are replaced; any other
//! brace is left as written, so shell snippets such as `awk '{print $1}'` survive untouched.
//!
//! A gather reference `@stage/<pattern>` matches expansion suffixes with [`glob_match`]:
//! `*` is any run of characters and every other character stands for itself. General glob
//! syntax (`?`, `[...]`) is deliberately not supported: matrix values may contain those
//! characters, and a suffix pattern only ever needs "any value here".

use std::borrow::Cow;

/// Replace `{name}` for every substitution; unknown braces stay as written.
pub(crate) fn subst<'s>(s: &'s str, subs: &[(String, String)]) -> Cow<'s, str> {
    if subs.is_empty() || !s.contains('{') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let hit = after.find('}').and_then(|close| {
            subs.iter()
                .find(|(k, _)| k == &after[..close])
                .map(|(_, v)| (close, v))
        });
        match hit {
            Some((close, v)) => {
                out.push_str(v);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (possibly
/// empty). Linear-time in practice: the literal pieces between stars are found left to
/// right, which is exact for a pattern whose only wildcard is `*`.
pub(crate) fn glob_match(pattern: &str, text: &str) -> bool {
    let Some((head, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let (middle, tail) = rest.rsplit_once('*').unwrap_or(("", rest));
    if text.len() < head.len() + tail.len() || !text.starts_with(head) || !text.ends_with(tail) {
        return false;
    }
    let mut hay = &text[head.len()..text.len() - tail.len()];
    for piece in middle.split('*').filter(|p| !p.is_empty()) {
        match hay.find(piece) {
            Some(i) => hay = &hay[i + piece.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::{glob_match, subst};

    #[test]
    fn glob_star_matches_any_run() {
        let yes = [
            ("*", ""),
            ("*", "x=0,lam=2500,task=A"),
            ("x=0,lam=2500,task=*", "x=0,lam=2500,task=GQA"),
            ("x=*,lam=0,task=A", "x=20,lam=0,task=A"),
            ("*task=A", "x=0,task=A"),
            ("a*b*c", "abc"),
            ("a*b*c", "a-b-b-c"),
            ("**", "anything"),
            ("exact", "exact"),
            ("é*", "éa"),
        ];
        for (p, t) in yes {
            assert!(glob_match(p, t), "{p} should match {t}");
        }
        let no = [
            ("x=0,task=*", "x=20,task=A"),
            ("*task=A", "x=0,task=AB"),
            ("a*b*c", "acb"),
            ("ab*ba", "aba"),
            ("exact", "exactly"),
            ("*.metrics", "x=0"),
        ];
        for (p, t) in no {
            assert!(!glob_match(p, t), "{p} should not match {t}");
        }
    }

    fn subs() -> Vec<(String, String)> {
        vec![("item".into(), "GQA".into()), ("index".into(), "2".into())]
    }

    #[test]
    fn substitutes_known_names_only() {
        assert_eq!(subst("@asd/{item}", &subs()), "@asd/GQA");
        assert_eq!(subst("{index}-{item}-{index}", &subs()), "2-GQA-2");
        assert_eq!(
            subst("awk '{print $1}' {item}", &subs()),
            "awk '{print $1}' GQA"
        );
        assert_eq!(subst("unclosed {item", &subs()), "unclosed {item");
        assert_eq!(subst("{}{{item}}", &subs()), "{}{GQA}");
        assert_eq!(subst("no braces", &[]), "no braces");
    }
}
