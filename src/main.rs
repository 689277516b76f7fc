//! `pipeline`: the thin binary. Parse the command line, dispatch to `commands`, map the
//! outcome to an exit code (0 ok, 1 a stage failed, 2 invalid recipe or usage, 3
//! environment error, 130 interrupted) and render errors with miette.

mod cli;
mod commands;
#[cfg(feature = "ml")]
mod model_cmd;
mod reporters;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the system allocator: the engine's hot paths (recipe loading, key
/// manifests, entry manifests) allocate many small strings and vectors, and glibc's
/// malloc/free were about a third of all instructions of a no-op rerun (README, engine
/// results). The allocator is process-wide, so the in-process ML stages use it too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Fancy diagnostics (source snippets, labels, help); colours follow the terminal and
    // NO_COLOR.
    let _ = miette::set_hook(Box::new(|_| {
        Box::new(
            miette::MietteHandlerOpts::new()
                .terminal_links(false)
                .build(),
        )
    }));
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version on stdout (exit 0) and usage errors on stderr (exit 2).
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let code = match commands::dispatch(cli) {
        Ok(code) => code,
        Err(failure) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("{:?}", failure.report);
            }
            failure.code
        }
    };
    ExitCode::from(code)
}
