//! `tartarus gc`: remove what a crashed supervisor left behind.

use tartarus_runtime::process::{ProcessRuntime, ProcessRuntimeConfig};

use super::run::runtime_config;

pub fn run() -> anyhow::Result<u8> {
    let config: ProcessRuntimeConfig = runtime_config();
    let removed = ProcessRuntime::new(config).collect_garbage();
    for path in &removed {
        println!("removed {}", path.display());
    }
    eprintln!(
        "tartarus: gc removed {} leftover(s) (cgroups, sandbox networks)",
        removed.len()
    );
    Ok(0)
}
