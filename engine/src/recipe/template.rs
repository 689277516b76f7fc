//! Text templates in recipe strings: `{name}` substitution.
//!
//! Only names the expansion defines (`{item}`, `{index}`, `{<dim>}`) are replaced; any other
//! brace is left as written, so shell snippets such as `awk '{print $1}'` survive untouched.

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

#[cfg(test)]
mod tests {
    use super::subst;

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
