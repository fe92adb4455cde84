//! `tartarus`: run untrusted code in isolated sandboxes.
//!
//! This binary is argument parsing and wiring only; the work happens in the library crates. Errors from
//! the libraries are printed once here, as one line with their whole cause chain.

// No Rust runtime start-up: it reads /proc/self/maps to find the main thread's stack guard and installs a
// signal stack, which together cost more than a sandbox's whole namespace setup. `std` works unchanged
// (arguments come from glibc's init_array hook); a stack overflow is a plain SIGSEGV.
#![no_main]

use clap::Parser;
use tartarus_cli::cli::{is_lean_command, LeanCli, LeanCommand};
use tartarus_cli::{commands, EXIT_TARTARUS_ERROR};

#[no_mangle]
extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    let code = real_main();
    // Flush stdout explicitly: without lang_start nothing else does it before exit.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    code
}

fn real_main() -> libc::c_int {
    // Inside a gVisor service sandbox this executable performs file operations.
    if let Some(code) = tartarus_runtime::gvisor::agent::run_if_invoked() {
        return code;
    }
    // As PID 1 of a microVM guest this executable is the guest agent.
    if let Some(code) = tartarus_runtime::microvm::agent::run_if_invoked() {
        return code;
    }
    if commands::zygote::invoked_as_python() {
        return commands::zygote::main();
    }
    let lean = std::env::args_os()
        .nth(1)
        .is_some_and(|first| is_lean_command(&first));
    if !lean {
        return report(exec_control_binary());
    }
    let cli = match LeanCli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e) as libc::c_int,
    };
    report(match cli.command {
        LeanCommand::Run(args) => commands::run::run(args),
        LeanCommand::Gc => commands::gc::run(),
        LeanCommand::Shim(args) => commands::shim::run(args),
        LeanCommand::Runtimes(args) => commands::runtimes::run(args),
        LeanCommand::Envd(args) => commands::envd::run(args),
    })
}

fn report(result: anyhow::Result<u8>) -> libc::c_int {
    match result {
        Ok(code) => code as libc::c_int,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("tartarus: {}", chain.join(": "));
            EXIT_TARTARUS_ERROR as libc::c_int
        }
    }
}

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

/// Replaces this process with `tartarus-control` (next to this binary), passing the same arguments.
fn exec_control_binary() -> anyhow::Result<u8> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let server = exe.with_file_name("tartarus-control");
    let error = std::process::Command::new(&server)
        .args(std::env::args_os().skip(1))
        .exec();
    anyhow::bail!(
        "cannot run {}: {error}; it is built with tartarus (cargo build --release) and must sit next to it",
        server.display()
    )
}
