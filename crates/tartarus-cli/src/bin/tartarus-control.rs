//! `tartarus-control`: the control plane and its clients. Users run these as `tartarus server`,
//! `tartarus apikey`, `tartarus exec`, …; the `tartarus` binary hands them over here, so that its own
//! start-up, paid by every sandbox, does not carry the HTTP, database and client stacks.

use clap::Parser;
use tartarus_cli::cli::{run_control, Cli};
use tartarus_cli::EXIT_TARTARUS_ERROR;

/// glibc's malloc arenas for the whole process. By default glibc gives each thread that allocates
/// while the others hold theirs a new arena, up to eight per core, and keeps what each one ever held:
/// the server's Tokio workers and blocking threads then hold several times the memory in use (the
/// soak measured 26 MiB of anonymous memory after 2,000 cycles with the default, 9 MiB with one
/// arena). Two keep contention low on the cores a server here has.
const MALLOC_ARENAS: libc::c_int = 2;

fn main() -> std::process::ExitCode {
    // Before any thread exists. An explicit MALLOC_ARENA_MAX in the environment still wins.
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable of the allocator; no other thread is running yet.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
    }
    // Client commands end quietly when their reader goes (`| head`); the server ignores SIGPIPE itself.
    tartarus_hostsys::default_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(if e.use_stderr() { EXIT_TARTARUS_ERROR } else { 0 });
        }
    };
    match run_control(cli.command) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("tartarus: {}", chain.join(": "));
            std::process::ExitCode::from(EXIT_TARTARUS_ERROR)
        }
    }
}
