//! Runs the daemon on the host for manual and SDK checks without the whole `tartarus` binary:
//! `cargo run -p tartarus-envd --example envd -- 127.0.0.1:49983` (HOME is the user's home).

fn main() -> std::process::ExitCode {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:49983".into());
    match listen.parse() {
        Ok(addr) => tartarus_envd::run(addr),
        Err(e) => {
            eprintln!("bad listen address {listen:?}: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
