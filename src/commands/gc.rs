//! `pipeline gc`: keep what the named recipes reference (each stage's current key when it
//! is known, and its last committed key), remove the rest.

use std::collections::{BTreeSet, HashSet};

use cache::Key;
use engine::exec::KeyEnv;

use super::{CmdResult, Failure, cache_dir, load, open_cache, out, registry};
use crate::cli::{GcArgs, GlobalArgs};

pub fn gc(g: &GlobalArgs, args: &GcArgs) -> CmdResult {
    let registry = registry();
    let cache = open_cache(g)?;
    let env = KeyEnv {
        env: engine::env_vars::keyed_env(),
    };
    let mut keep: HashSet<Key> = HashSet::new();
    for path in &args.recipes {
        let recipe = load(path, &[], &registry)?;
        let plan = engine::plan::plan(&recipe, &registry, &cache, &env, &BTreeSet::new());
        keep.extend(plan.rows.iter().filter_map(|r| r.key));
        for stage in &recipe.stages {
            if let Ok(Some(k)) = cache.get_ref(&recipe.experiment, &stage.name) {
                keep.insert(k);
            }
        }
    }
    if args.dry_run {
        // Entries are `v1/entries/<64-hex key>/` (the cache's documented layout).
        let dir = cache_dir(g).join(cache::LAYOUT_VERSION).join("entries");
        let doomed = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.get(..64))
                            .and_then(|n| n.parse::<Key>().ok())
                    })
                    .filter(|k| !keep.contains(k))
                    .count()
            })
            .unwrap_or(0);
        out(&format!(
            "would remove {doomed} entries (keeping {} referenced keys); nothing removed\n",
            keep.len()
        ));
        return Ok(0);
    }
    let stats = cache
        .gc(&keep)
        .map_err(|e| Failure::environment(miette::miette!("gc failed: {e}")))?;
    // The resolved-recipe cache (`recipe::load_memo`) is only a speed-up, one file per
    // recipe path loaded: emptied here so it cannot grow without bound; the next load of
    // each recipe stores it again.
    let _ = std::fs::remove_dir_all(cache_dir(g).join(cache::LAYOUT_VERSION).join("recipes"));
    out(&format!(
        "removed {} entries, {} objects, {} trees, {} checkpoints, {} temp files ({} bytes freed); kept {} keys\n",
        stats.entries,
        stats.objects,
        stats.trees,
        stats.checkpoints,
        stats.tmp,
        stats.bytes,
        keep.len()
    ));
    Ok(0)
}
