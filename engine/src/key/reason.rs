//! [`RerunReason`]: why a stage runs, computed by diffing the current [`KeyManifest`] against
//! the one of the stage's last committed run (found through the cache's `refs/`).
//!
//! Unlike a first-difference check, [`diff`] lists *every* difference: a param edit and a
//! changed input file at once are both reported. A stage whose only reasons are inputs
//! changed by upstream stages that reran in this run is a **cascade**; any other reason
//! makes it a **root**. Roots are printed first, since they are what the user changed.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::manifest::KeyManifest;

/// One reason a stage (re)runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum RerunReason {
    /// The stage has no committed run under this experiment.
    NeverRun,
    /// A parameter changed (`path` is dotted: `reglora.lambda`, `tasks[2]`).
    #[serde(rename_all = "kebab-case")]
    ParamChanged {
        /// Dotted path of the parameter.
        path: String,
        /// Previous value (`null` when it was absent).
        old: serde_json::Value,
        /// Current value (`null` when it is absent).
        new: serde_json::Value,
    },
    /// An upstream output feeding `input` has different content.
    #[serde(rename_all = "kebab-case")]
    InputChanged {
        /// The parameter holding the reference.
        input: String,
        /// The upstream stage.
        upstream: String,
        /// Whether the upstream stage reran in this run (a cascade) rather than having been
        /// changed by an earlier run.
        reran: bool,
    },
    /// The content of an external file changed.
    #[serde(rename_all = "kebab-case")]
    ExternalFileChanged {
        /// The path, relative to the recipe directory.
        path: String,
    },
    /// The kind's version was bumped (its semantics changed).
    #[serde(rename_all = "kebab-case")]
    KindVersionChanged {
        /// Kind name.
        kind: String,
        /// Previous version.
        old: u32,
        /// Current version.
        new: u32,
    },
    /// The stage's kind itself changed.
    #[serde(rename_all = "kebab-case")]
    KindChanged {
        /// Previous kind.
        old: String,
        /// Current kind.
        new: String,
    },
    /// The derived seed changed (the experiment seed changed).
    SeedChanged {
        /// Previous seed.
        old: u64,
        /// Current seed.
        new: u64,
    },
    /// An allowlisted environment variable changed.
    EnvChanged {
        /// Variable name.
        name: String,
        /// Previous value.
        old: Option<String>,
        /// Current value.
        new: Option<String>,
    },
    /// The key encoding itself changed (a new `pipeline` version).
    KeySchemaChanged {
        /// Previous schema.
        old: u32,
        /// Current schema.
        new: u32,
    },
    /// `--force` named the stage.
    Forced,
    /// The stage's key was committed but its outputs are gone.
    OutputsMissing,
    /// The cache entry failed verification (a corrupt or unreadable object or manifest).
    CacheCorrupt {
        /// What was wrong.
        detail: String,
    },
    /// An earlier attempt at this very key was interrupted; its checkpoints are reused.
    PreviousAttemptIncomplete,
}

impl RerunReason {
    /// Whether this reason is only a consequence of an upstream rerun in the same run.
    #[must_use]
    pub fn is_cascade(&self) -> bool {
        matches!(self, Self::InputChanged { reran: true, .. })
    }
}

/// Whether a set of reasons makes the stage a cascade (every reason is a cascade).
#[must_use]
pub fn is_cascade(reasons: &[RerunReason]) -> bool {
    !reasons.is_empty() && reasons.iter().all(RerunReason::is_cascade)
}

impl fmt::Display for RerunReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NeverRun => write!(f, "never run"),
            Self::ParamChanged { path, old, new } => {
                write!(
                    f,
                    "param `{}` changed ({} → {})",
                    short_path(path),
                    show(old),
                    show(new)
                )
            }
            Self::InputChanged {
                input,
                upstream,
                reran: true,
            } => {
                write!(f, "input `{input}` changed (upstream `{upstream}` reran)")
            }
            Self::InputChanged {
                input,
                upstream,
                reran: false,
            } => {
                write!(
                    f,
                    "input `{input}` changed (upstream `{upstream}` has new outputs)"
                )
            }
            Self::ExternalFileChanged { path } => write!(f, "file `{path}` changed"),
            Self::KindVersionChanged { kind, old, new } => {
                write!(f, "kind `{kind}` version changed ({old} → {new})")
            }
            Self::KindChanged { old, new } => write!(f, "kind changed (`{old}` → `{new}`)"),
            Self::SeedChanged { old, new } => write!(f, "seed changed ({old} → {new})"),
            Self::EnvChanged { name, old, new } => write!(
                f,
                "env `{name}` changed ({} → {})",
                old.as_deref().unwrap_or("unset"),
                new.as_deref().unwrap_or("unset")
            ),
            Self::KeySchemaChanged { old, new } => write!(f, "key schema changed ({old} → {new})"),
            Self::Forced => write!(f, "forced"),
            Self::OutputsMissing => write!(f, "outputs missing"),
            Self::CacheCorrupt { detail } => write!(f, "cache entry corrupt ({detail})"),
            Self::PreviousAttemptIncomplete => write!(f, "previous attempt incomplete (resuming)"),
        }
    }
}

/// The `shell` kind keeps user parameters in a `params` table that commands use as
/// `${params.NAME}`; the prefix is noise in messages (the JSON keeps the full path).
fn short_path(path: &str) -> &str {
    path.strip_prefix("params.").unwrap_or(path)
}

/// Values are shown as TOML-ish literals; `null` means "absent".
fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "absent".to_owned(),
        other => other.to_string(),
    }
}

/// Every difference between the previous manifest and the current one.
///
/// `reran(upstream)` says whether an upstream stage (re)ran in this run; it decides whether
/// an input change is a cascade. Returns an empty list when the manifests key identically.
#[must_use]
pub fn diff(
    old: &KeyManifest,
    new: &KeyManifest,
    reran: &dyn Fn(&str) -> bool,
) -> Vec<RerunReason> {
    let mut out = Vec::new();
    if old.schema != new.schema {
        out.push(RerunReason::KeySchemaChanged {
            old: old.schema,
            new: new.schema,
        });
    }
    if old.kind != new.kind {
        out.push(RerunReason::KindChanged {
            old: old.kind.clone(),
            new: new.kind.clone(),
        });
    } else if old.kind_version != new.kind_version {
        out.push(RerunReason::KindVersionChanged {
            kind: new.kind.clone(),
            old: old.kind_version,
            new: new.kind_version,
        });
    }
    diff_values("", &old.params, &new.params, &mut out);
    diff_inputs(old, new, reran, &mut out);
    for ext in &new.externals {
        let before = old
            .externals
            .iter()
            .find(|o| o.param == ext.param && o.path == ext.path);
        // A path that is new is already reported as a param change; only content counts here.
        if before.is_some_and(|b| b.digest != ext.digest) {
            out.push(RerunReason::ExternalFileChanged {
                path: ext.path.clone(),
            });
        }
    }
    if old.seed != new.seed {
        out.push(RerunReason::SeedChanged {
            old: old.seed,
            new: new.seed,
        });
    }
    let names: std::collections::BTreeSet<&String> = old.env.keys().chain(new.env.keys()).collect();
    for name in names {
        let (o, n) = (old.env.get(name), new.env.get(name));
        if o != n {
            out.push(RerunReason::EnvChanged {
                name: name.clone(),
                old: o.cloned(),
                new: n.cloned(),
            });
        }
    }
    out
}

fn diff_inputs(
    old: &KeyManifest,
    new: &KeyManifest,
    reran: &dyn Fn(&str) -> bool,
    out: &mut Vec<RerunReason>,
) {
    // Indexed, not scanned: a fan-in stage has thousands of inputs, and a scan per input
    // made its diff quadratic.
    let before: std::collections::HashMap<(&str, usize), &cache::Digest> = old
        .inputs
        .iter()
        .map(|o| ((o.param.as_str(), o.position), &o.digest))
        .collect();
    // One reason per (param, upstream) pair, even when a gather holds many changed items.
    let mut seen: std::collections::HashSet<(&str, &str)> = std::collections::HashSet::new();
    for input in &new.inputs {
        let changed = match before.get(&(input.param.as_str(), input.position)) {
            Some(b) => **b != input.digest,
            // A reference added or moved shows up as a param change unless the params are
            // identical (a gather that grew); then it is an input change.
            None => true,
        };
        if changed && seen.insert((&input.param, &input.upstream)) {
            out.push(RerunReason::InputChanged {
                input: input.param.clone(),
                upstream: input.upstream.clone(),
                reran: reran(&input.upstream),
            });
        }
    }
}

fn diff_values(
    path: &str,
    old: &serde_json::Value,
    new: &serde_json::Value,
    out: &mut Vec<RerunReason>,
) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort_unstable();
            keys.dedup();
            for k in keys {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff_values(
                    &child,
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff_values(&format!("{path}[{i}]"), x, y, out);
            }
        }
        (a, b) if !same_value(a, b) => out.push(RerunReason::ParamChanged {
            path: path.to_owned(),
            old: a.clone(),
            new: b.clone(),
        }),
        _ => {}
    }
}

/// Equality as the key sees it (`1` and `1.0` differ, `-0.0` and `0.0` do not).
fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use super::hasher::StableHasher;
    if a == b {
        return true;
    }
    let digest = |v: &serde_json::Value| {
        let mut h = StableHasher::new("pipeline value equality");
        h.write(v);
        h.finish()
    };
    digest(a) == digest(b)
}

/// Sort stages so that roots come before cascades, keeping the given order otherwise.
pub fn roots_first<T>(items: &mut [T], reasons: impl Fn(&T) -> &[RerunReason]) {
    items.sort_by_key(|t| is_cascade(reasons(t)));
}

#[cfg(test)]
mod tests {
    use super::super::KEY_SCHEMA;
    use super::super::manifest::{ExternalDigest, InputDigest};
    use super::*;
    use cache::Digest;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn manifest(params: serde_json::Value, input: u8, ext: u8) -> KeyManifest {
        KeyManifest {
            schema: KEY_SCHEMA,
            kind: "test.echo".into(),
            kind_version: 1,
            params,
            inputs: vec![InputDigest {
                param: "deps".into(),
                position: 0,
                upstream: "a".into(),
                output: "out".into(),
                digest: Digest([input; 32]),
            }],
            externals: vec![ExternalDigest {
                param: "file".into(),
                path: "data/x.json".into(),
                digest: Digest([ext; 32]),
            }],
            seed: 1,
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn identical_manifests_have_no_reasons() {
        let m = manifest(json!({"p": 1}), 1, 1);
        assert!(diff(&m, &m.clone(), &|_| false).is_empty());
    }

    #[test]
    fn lists_every_difference() {
        let old = manifest(json!({"p": 1, "opt": {"lr": 2e-4, "wd": 0.0}}), 1, 1);
        let mut new = manifest(
            json!({"p": 2, "opt": {"lr": 1e-4, "wd": 0.0}, "extra": true}),
            2,
            3,
        );
        new.kind_version = 2;
        new.env.insert("PIPELINE_DEVICE".into(), "cuda".into());
        let reasons = diff(&old, &new, &|up| up == "a");
        let text: Vec<String> = reasons.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "kind `test.echo` version changed (1 → 2)",
                "param `extra` changed (absent → true)",
                "param `opt.lr` changed (0.0002 → 0.0001)",
                "param `p` changed (1 → 2)",
                "input `deps` changed (upstream `a` reran)",
                "file `data/x.json` changed",
                "env `PIPELINE_DEVICE` changed (unset → cuda)",
            ]
        );
        assert!(!is_cascade(&reasons));
    }

    #[test]
    fn input_only_from_rerun_upstream_is_a_cascade() {
        let old = manifest(json!({"p": 1}), 1, 1);
        let new = manifest(json!({"p": 1}), 2, 1);
        let cascade = diff(&old, &new, &|_| true);
        assert!(is_cascade(&cascade));
        let root = diff(&old, &new, &|_| false);
        assert!(!is_cascade(&root));
        assert_eq!(
            root[0].to_string(),
            "input `deps` changed (upstream `a` has new outputs)"
        );
    }

    #[test]
    fn reasons_serialize_kebab_case_tagged() {
        let r = RerunReason::ParamChanged {
            path: "p".into(),
            old: json!(1),
            new: json!(2),
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"reason": "param-changed", "path": "p", "old": 1, "new": 2})
        );
        let r = RerunReason::InputChanged {
            input: "deps".into(),
            upstream: "a".into(),
            reran: true,
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"reason": "input-changed", "input": "deps", "upstream": "a", "reran": true})
        );
        assert_eq!(
            serde_json::to_value(RerunReason::NeverRun).unwrap(),
            json!({"reason": "never-run"})
        );
        let back: RerunReason =
            serde_json::from_value(json!({"reason": "previous-attempt-incomplete"})).unwrap();
        assert_eq!(back, RerunReason::PreviousAttemptIncomplete);
    }

    #[test]
    fn roots_sort_before_cascades() {
        let cascade = vec![RerunReason::InputChanged {
            input: "x".into(),
            upstream: "a".into(),
            reran: true,
        }];
        let root = vec![RerunReason::Forced];
        let mut items = vec![("c", cascade.clone()), ("r", root), ("c2", cascade)];
        roots_first(&mut items, |t| &t.1);
        assert_eq!(
            items.iter().map(|t| t.0).collect::<Vec<_>>(),
            ["r", "c", "c2"]
        );
    }
}
