//! `tartarus`: run untrusted code in isolated sandboxes.
//!
//! This binary is argument parsing and wiring only; the work happens in the library crates. Errors from
//! the libraries are printed once here, as one line with their whole cause chain.

mod commands;
mod terminal;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// Exit code for a failure of Tartarus itself (as opposed to the sandboxed command's own exit code).
pub const EXIT_TARTARUS_ERROR: u8 = 125;

#[derive(Parser)]
#[command(
    name = "tartarus",
    version,
    about = "Run untrusted code in isolated sandboxes",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a new sandbox and exit with its exit code
    Run(commands::run::RunArgs),
    /// Remove cgroups left behind by a crashed `tartarus run`
    Gc,
    /// Print a shell completion script
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let result = match cli.command {
        Command::Run(args) => commands::run::run(args),
        Command::Gc => commands::gc::run(),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tartarus", &mut std::io::stdout());
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("tartarus: {}", chain.join(": "));
            ExitCode::from(EXIT_TARTARUS_ERROR)
        }
    }
}

/// Prints `tartarus: <error>: <cause>: <cause>` on one line.
pub fn print_error(e: &(dyn std::error::Error + 'static)) {
    let mut line = format!("tartarus: {e}");
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    eprintln!("{line}");
}

/// Help and version go to stdout with success; usage errors become one line with a pointer to --help.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let rendered = e.render().to_string();
    let mut lines = rendered.lines().filter(|l| !l.trim().is_empty());
    let first = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    let tip = lines
        .find_map(|l| l.trim().strip_prefix("tip: "))
        .map(|t| format!("; {t}"))
        .unwrap_or_default();
    eprintln!("tartarus: {first}{tip} (see 'tartarus --help')");
    ExitCode::from(EXIT_TARTARUS_ERROR)
}
