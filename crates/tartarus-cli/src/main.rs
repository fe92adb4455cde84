//! `tartarus`: run untrusted code in isolated sandboxes.
//!
//! This binary is argument parsing and wiring only; the work happens in the library crates. Errors from
//! the libraries are printed once here, as one line with their whole cause chain.

// No Rust runtime start-up: it reads /proc/self/maps to find the main thread's stack guard and installs a
// signal stack, which together cost more than a sandbox's whole namespace setup. `std` works unchanged
// (arguments come from glibc's init_array hook); a stack overflow is a plain SIGSEGV.
#![no_main]

mod client;
mod commands;
mod terminal;

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
#[allow(clippy::large_enum_variant)] // parsed once per process; boxing buys nothing
enum Command {
    /// Run a command in a new sandbox and exit with its exit code
    Run(commands::run::RunArgs),
    /// Remove cgroups left behind by a crashed `tartarus run`
    Gc,
    /// Serve the REST API over long-lived sandboxes
    Server(commands::server::ServerArgs),
    /// Set or show where the server is and which key to use
    Config(commands::remote::ConfigArgs),
    /// Create a sandbox on the server and print its id
    Create(commands::remote::CreateArgs),
    /// List sandboxes on the server
    Ps(commands::remote::PsArgs),
    /// Show one sandbox as JSON
    Inspect { id: String },
    /// Run a command in a sandbox on the server; exits with its exit code
    Exec(commands::remote::ExecArgs),
    /// Print a sandbox's main output (--follow streams it)
    Logs {
        id: String,
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Copy a file between the host and a sandbox (SANDBOX_ID:/path on one side)
    Cp { src: String, dst: String },
    /// Kill a sandbox on the server and remove it
    Kill { id: String },
    /// Freeze every process of a sandbox on the server
    Pause { id: String },
    /// Thaw a paused sandbox on the server
    Resume { id: String },
    /// Manage API keys of the server (tenants and roles)
    Apikey(commands::apikey::ApiKeyArgs),
    /// Supervise one long-lived sandbox and serve requests for it on a unix socket (used by the server)
    #[command(hide = true)]
    Shim(commands::shim::ShimArgs),
    /// Print a shell completion script
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[no_mangle]
extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    let code = real_main();
    // Flush stdout explicitly: without lang_start nothing else does it before exit.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    code
}

fn real_main() -> libc::c_int {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e) as libc::c_int,
    };
    let result = match cli.command {
        Command::Run(args) => commands::run::run(args),
        Command::Gc => commands::gc::run(),
        Command::Apikey(args) => commands::apikey::run(args),
        Command::Server(args) => commands::server::run(args),
        Command::Config(args) => commands::remote::config(args),
        Command::Create(args) => commands::remote::create(args),
        Command::Ps(args) => commands::remote::ps(args),
        Command::Inspect { id } => commands::remote::inspect(id),
        Command::Exec(args) => commands::remote::exec(args),
        Command::Logs { id, follow } => commands::remote::logs(id, follow),
        Command::Cp { src, dst } => commands::remote::cp(src, dst),
        Command::Kill { id } => commands::remote::kill(id),
        Command::Pause { id } => commands::remote::set_paused(id, true),
        Command::Resume { id } => commands::remote::set_paused(id, false),
        Command::Shim(args) => commands::shim::run(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tartarus", &mut std::io::stdout());
            Ok(0)
        }
    };
    match result {
        Ok(code) => code as libc::c_int,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("tartarus: {}", chain.join(": "));
            EXIT_TARTARUS_ERROR as libc::c_int
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
fn usage_error(e: clap::Error) -> u8 {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return 0;
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
    EXIT_TARTARUS_ERROR
}
