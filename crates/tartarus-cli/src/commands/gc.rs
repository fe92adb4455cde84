//! `tartarus gc`: remove what a crashed supervisor left behind.

use tartarus_runtime::gvisor::GvisorRuntime;
use tartarus_runtime::microvm::MicrovmRuntime;
use tartarus_runtime::process::ProcessRuntime;

use super::run::lane_config;

pub fn run() -> anyhow::Result<u8> {
    let config = lane_config()?;
    let mut removed = ProcessRuntime::new(config.process.clone()).collect_garbage();
    // gVisor's leftovers (containers, bundles, their cgroups) need runsc to be deleted; a host without it
    // has none.
    let gvisor = match GvisorRuntime::open(&config) {
        Ok(runtime) => {
            removed.extend(runtime.collect_garbage());
            None
        }
        Err(e) => Some(e),
    };
    // MicroVM leftovers: VM directories (sockets, logs) of dead supervisors, whose QEMU died with them.
    if let Ok(runtime) = MicrovmRuntime::open(&config) {
        removed.extend(runtime.collect_garbage());
    }
    // Wasm scratch directories (a supervisor without root) of dead supervisors.
    removed.extend(tartarus_runtime::wasm::collect_garbage());
    for path in &removed {
        println!("removed {}", path.display());
    }
    let skipped = gvisor
        .map(|e| format!("; gVisor state not checked: {e}"))
        .unwrap_or_default();
    eprintln!(
        "tartarus: gc removed {} leftover(s) (cgroups, sandbox networks, gVisor containers, microVM and Wasm scratch directories){skipped}",
        removed.len()
    );
    Ok(0)
}
