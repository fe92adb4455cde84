//! `tartarus-control`: the control plane and its clients. Users run these as `tartarus server`,
//! `tartarus apikey`, `tartarus exec`, …; the `tartarus` binary hands them over here, so that its own
//! start-up, paid by every sandbox, does not carry the HTTP, database and client stacks.

use clap::Parser;
use tartarus_cli::cli::{run_control, Cli};
use tartarus_cli::EXIT_TARTARUS_ERROR;

fn main() -> std::process::ExitCode {
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
