//! Recipe and graph tests: error rendering (insta snapshots of every error class), expansion
//! semantics, overrides, graph selection/rendering, fuzzing and load speed.

mod errors;
mod expand;
mod fuzz;
mod graph;
mod kinds;
mod memo;
mod perf;

use std::path::{Path, PathBuf};

use engine::recipe::{Recipe, RecipeError};

/// A fixture path, relative to the engine crate (the working directory of its tests), so
/// that rendered diagnostics show short, machine-independent file names.
pub(crate) fn fixture(rel: &str) -> PathBuf {
    Path::new("tests/fixtures/recipes").join(rel)
}

/// Load a fixture with `--set` overrides.
pub(crate) fn load(rel: &str, sets: &[&str]) -> Result<Recipe, RecipeError> {
    let sets: Vec<String> = sets.iter().map(|s| (*s).to_string()).collect();
    engine::recipe::load(&fixture(rel), &sets, &kinds::registry())
}

/// Render a diagnostic as the CLI would, without colours, at a fixed width.
pub(crate) fn render(d: &dyn miette::Diagnostic) -> String {
    let handler =
        miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
            .with_width(100)
            .with_links(false);
    let mut out = String::new();
    handler
        .render_report(&mut out, d)
        .expect("rendering into a String cannot fail");
    out
}
