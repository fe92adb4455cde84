//! One conformance suite for every lane (issue 15, item 5): the lifecycle, service-mode and hostile-tenant
//! checks are each written once, as a function of a [`harness::Fixture`] (the lane plus its own state
//! directory and cgroup parent), and [`suite!`] makes one `#[test]` per (lane, check): `process::…` and
//! `gvisor::…`, `microvm::…`, `wasm::…`. After every check the harness asserts that nothing is left behind (cgroups, runsc
//! containers and bundles, shims, network namespaces).
//!
//! A lane this host cannot run fails every one of its tests with the probe's reason; CI may exclude a lane
//! only by saying why, in `TARTARUS_CONFORMANCE_EXCLUDE="lane: why"` (see `.ci/run`). A new lane joins
//! with one more name in the `lanes:` list below and one [`harness::Lane`] variant; what it cannot do
//! (its `LaneCapabilities`) the checks assert as a clear refusal.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;
#[path = "lanes_conformance/harness.rs"]
mod harness;
#[path = "lanes_conformance/hostile.rs"]
mod hostile;
#[path = "lanes_conformance/oneshot.rs"]
mod oneshot;
#[path = "lanes_conformance/service.rs"]
mod service;
#[path = "lanes_conformance/wasm_checks.rs"]
mod wasm_checks;

/// One module per lane, one test per check in it.
macro_rules! suite {
    (lanes: [$($lane:ident),* $(,)?]; checks: $checks:tt) => {
        $( suite!(@lane $lane, $checks); )*
    };
    (@lane $lane:ident, [$($module:ident :: $check:ident),* $(,)?]) => {
        mod $lane {
            $(
                #[test]
                fn $check() {
                    $crate::harness::conform(stringify!($lane), stringify!($check), $crate::$module::$check);
                }
            )*
        }
    };
}

suite! {
    lanes: [process, gvisor];
    checks: [
        oneshot::exit_code_is_passed_through,
        oneshot::death_by_signal_is_128_plus_the_signal,
        oneshot::a_timeout_sends_sigterm_and_a_trapping_command_ends_in_its_grace,
        oneshot::a_timeout_kills_a_command_ignoring_sigterm_after_the_grace,
        oneshot::the_memory_limit_ends_in_an_oom,
        oneshot::stdin_stdout_and_stderr_are_separate,
        oneshot::env_workdir_and_user_reach_the_command,
        oneshot::a_missing_workdir_is_refused,
        oneshot::a_missing_command_is_127,
        oneshot::a_terminal_is_given_or_clearly_refused,
        oneshot::a_background_grandchild_dies_with_the_sandbox,
        oneshot::a_fork_bomb_stops_at_the_pids_limit,
        hostile::the_network_has_only_loopback,
        hostile::a_host_loopback_listener_is_unreachable,
        hostile::vsock_sockets_cannot_be_created,
        hostile::no_capabilities_and_mounting_fails,
        hostile::host_files_are_invisible,
        hostile::host_processes_are_invisible,
        hostile::only_the_scratch_areas_are_writable,
        service::the_api_names_the_lane_and_runs_execs,
        service::execs_separate_stdin_stdout_stderr_and_exit_codes,
        service::an_exec_killed_by_a_signal_reports_it,
        service::an_exec_timeout_is_reported,
        service::streamed_execs_deliver_output_while_running,
        service::execs_get_env_cwd_and_user,
        service::an_exec_in_a_missing_cwd_is_refused,
        service::files_are_written_read_and_listed,
        service::a_paused_sandbox_stops_and_resumes,
        service::a_paused_sandbox_can_be_deleted,
        service::a_delete_with_grace_sends_sigterm_then_sigkill,
        service::a_main_commands_exit_timeout_and_oom_are_its_outcome,
        service::a_delete_ends_background_processes_and_leaves_nothing,
        service::a_fork_bomb_in_an_exec_stops_at_the_pids_limit,
        service::quarantine_denies_its_syscalls_and_narrows_the_writable_paths,
    ]
}

// The microVM lane runs the one-shot, hostile and service checks that apply to a lane without bind
// mounts. Each is a TCG boot of seconds here. A terminal is a pty of the guest
// (`a_terminal_is_given_or_clearly_refused`); quarantine's writable paths are read-only mounts in the
// guest. Not here, and why: `a_background_grandchild_dies_with_the_sandbox` (it watches the grandchild
// through a bind mount, which the lane refuses; here every process of a sandbox lives in its VM, and the
// leak check after each check asserts that no QEMU is left).
suite! {
    lanes: [microvm];
    checks: [
        oneshot::exit_code_is_passed_through,
        oneshot::death_by_signal_is_128_plus_the_signal,
        oneshot::a_timeout_sends_sigterm_and_a_trapping_command_ends_in_its_grace,
        oneshot::a_timeout_kills_a_command_ignoring_sigterm_after_the_grace,
        oneshot::the_memory_limit_ends_in_an_oom,
        oneshot::stdin_stdout_and_stderr_are_separate,
        oneshot::env_workdir_and_user_reach_the_command,
        oneshot::a_missing_workdir_is_refused,
        oneshot::a_missing_command_is_127,
        oneshot::a_terminal_is_given_or_clearly_refused,
        oneshot::a_fork_bomb_stops_at_the_pids_limit,
        hostile::the_network_has_only_loopback,
        hostile::a_host_loopback_listener_is_unreachable,
        hostile::vsock_sockets_cannot_be_created,
        hostile::no_capabilities_and_mounting_fails,
        hostile::host_files_are_invisible,
        hostile::host_processes_are_invisible,
        hostile::only_the_scratch_areas_are_writable,
        service::the_api_names_the_lane_and_runs_execs,
        service::execs_separate_stdin_stdout_stderr_and_exit_codes,
        service::an_exec_killed_by_a_signal_reports_it,
        service::an_exec_timeout_is_reported,
        service::streamed_execs_deliver_output_while_running,
        service::execs_get_env_cwd_and_user,
        service::an_exec_in_a_missing_cwd_is_refused,
        service::files_are_written_read_and_listed,
        service::a_paused_sandbox_stops_and_resumes,
        service::a_paused_sandbox_can_be_deleted,
        service::a_delete_with_grace_sends_sigterm_then_sigkill,
        service::a_main_commands_exit_timeout_and_oom_are_its_outcome,
        service::a_delete_ends_background_processes_and_leaves_nothing,
        service::a_fork_bomb_in_an_exec_stops_at_the_pids_limit,
        service::quarantine_denies_its_syscalls_and_narrows_the_writable_paths,
    ]
}

// The Wasm lane runs Wasm programs, not ELF executables: every check above that runs `/bin/sh` or
// `python3` cannot apply as written. It runs `a_missing_command_is_127` as is, and `wasm_checks` asserts
// the same properties with Wasm programs where the lane has them (exit codes, the timeout, the memory
// limit as an oom, stdio, env and workdir, a refused terminal and network, no host files, only scratch
// writable), plus the API's refusal of a Wasm service sandbox. Not here, and why: death by a signal and
// the SIGTERM grace (a Wasm guest gets no signals: a timeout interrupts it at once, see
// `a_timeout_ends_an_endless_loop_with_reason_timeout`), a background grandchild, the fork bomb and the
// pids limit (a guest has no processes), a custom user (no users), the interface list, loopback, vsock
// and mounting (a guest has no sockets and no mount call; the network modes are refused by name),
// host processes (no /proc), and every service check (the lane has no service mode).
suite! {
    lanes: [wasm];
    checks: [
        oneshot::a_missing_command_is_127,
        wasm_checks::exit_code_is_passed_through,
        wasm_checks::a_timeout_ends_an_endless_loop_with_reason_timeout,
        wasm_checks::the_memory_limit_ends_in_an_oom,
        wasm_checks::stdin_stdout_and_stderr_are_separate,
        wasm_checks::env_and_workdir_reach_the_command,
        wasm_checks::a_workdir_other_than_tmp_is_refused,
        wasm_checks::a_terminal_is_clearly_refused,
        wasm_checks::the_network_is_refused_by_name,
        wasm_checks::host_files_are_invisible,
        wasm_checks::only_the_scratch_areas_are_writable,
        wasm_checks::the_api_refuses_a_service_sandbox_by_name,
    ]
}
