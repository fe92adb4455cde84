//! The seccomp-BPF filter applied to every sandboxed command.
//!
//! A deny list (allow by default) of syscalls that reach kernel attack surface a sandboxed program has no
//! business with, answered with EPERM so programs that probe features degrade gracefully. The program is
//! seccompiler's, with a five-instruction prefix that refuses the x32 ABI (syscall numbers with bit 30 set,
//! which seccompiler's per-number rules cannot express and which would otherwise bypass the list) and
//! answers clone3 with ENOSYS. One filter, because the kernel validates and JITs every filter at every
//! launch (docs/benchmarks.md).

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Syscalls refused outright, with the reason they are on the list.
pub const DENIED_SYSCALLS: &[(&str, i64)] = &[
    // Kernel code and state.
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("syslog", libc::SYS_syslog),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("vhangup", libc::SYS_vhangup),
    // Large attack surfaces: eBPF, perf, keyrings, io_uring, userfaultfd, fanotify.
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("fanotify_init", libc::SYS_fanotify_init),
    // Inspecting or controlling other processes.
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kcmp", libc::SYS_kcmp),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    // Filesystem topology, after setup.
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    // Namespaces.
    ("setns", libc::SYS_setns),
    // clone3 passes flags in memory that BPF cannot read; ENOSYS below makes libc fall back to clone.
    ("personality", libc::SYS_personality),
    ("uselib", libc::SYS_uselib),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
];

const TIOCSTI: u64 = 0x5412;
const TIOCLINUX: u64 = 0x541C;

/// Builds the main filter program.
/// Syscalls a policy may deny on top of [`DENIED_SYSCALLS`] (by name; x86_64 numbers). Denying them breaks
/// programs that need them, which is the point: a quarantined sandbox gets no sockets to the outside, no
/// cross-process memory access, no file-mode changes.
pub const EXTRA_DENIABLE_SYSCALLS: &[(&str, i64)] = &[
    ("socket", libc::SYS_socket),
    ("connect", libc::SYS_connect),
    ("bind", libc::SYS_bind),
    ("listen", libc::SYS_listen),
    ("accept", libc::SYS_accept),
    ("accept4", libc::SYS_accept4),
    ("sendto", libc::SYS_sendto),
    ("recvfrom", libc::SYS_recvfrom),
    ("sendmsg", libc::SYS_sendmsg),
    ("recvmsg", libc::SYS_recvmsg),
    ("sendmmsg", libc::SYS_sendmmsg),
    ("recvmmsg", libc::SYS_recvmmsg),
    ("socketpair", libc::SYS_socketpair),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("personality", libc::SYS_personality),
    ("mincore", libc::SYS_mincore),
    ("chmod", libc::SYS_chmod),
    ("fchmod", libc::SYS_fchmod),
    ("fchmodat", libc::SYS_fchmodat),
    ("chown", libc::SYS_chown),
    ("fchown", libc::SYS_fchown),
    ("lchown", libc::SYS_lchown),
    ("fchownat", libc::SYS_fchownat),
    ("link", libc::SYS_link),
    ("linkat", libc::SYS_linkat),
    ("symlink", libc::SYS_symlink),
    ("symlinkat", libc::SYS_symlinkat),
    ("mknod", libc::SYS_mknod),
    ("mknodat", libc::SYS_mknodat),
    ("kill", libc::SYS_kill),
    ("tkill", libc::SYS_tkill),
    ("memfd_create", libc::SYS_memfd_create),
    ("mprotect", libc::SYS_mprotect),
    ("inotify_init1", libc::SYS_inotify_init1),
    ("fanotify_init", libc::SYS_fanotify_init),
    ("sched_setaffinity", libc::SYS_sched_setaffinity),
    ("setpriority", libc::SYS_setpriority),
];

/// The number of a syscall that may be denied by name: the base list's or an extra one.
pub fn deniable_syscall(name: &str) -> Option<i64> {
    DENIED_SYSCALLS
        .iter()
        .chain(EXTRA_DENIABLE_SYSCALLS)
        .find(|(n, _)| *n == name)
        .map(|&(_, nr)| nr)
}

/// The deny-list filter plus `extra` syscall numbers.
pub fn build_filter_with(extra: &[i64]) -> Result<BpfProgram, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &(_, nr) in DENIED_SYSCALLS {
        rules.insert(nr, Vec::new());
    }
    for &nr in extra {
        rules.insert(nr, Vec::new());
    }
    // New user namespaces (the door to every other namespace type) via clone or unshare.
    let new_user = libc::CLONE_NEWUSER as u64;
    let flag_rule = |arg: u8| {
        SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(new_user),
            new_user,
        )?])
    };
    rules.insert(libc::SYS_unshare, vec![flag_rule(0)?]);
    rules.insert(libc::SYS_clone, vec![flag_rule(0)?]);
    // Terminal input injection into whatever terminal the sandbox was given.
    let ioctl_rule = |cmd: u64| {
        SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            cmd,
        )?])
    };
    rules.insert(
        libc::SYS_ioctl,
        vec![ioctl_rule(TIOCSTI)?, ioctl_rule(TIOCLINUX)?],
    );
    let denied: BpfProgram = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )?
    .try_into()?;
    Ok(denied)
}

/// The prefix: clone3 → ENOSYS (libc falls back to clone, whose flags the main rules inspect), and every
/// x32-ABI syscall → EPERM; anything else falls through to the next instruction. Prepending it leaves the
/// relative jumps of the program after it intact.
pub fn build_abi_prefix() -> BpfProgram {
    const LOAD_NR: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const X32_BIT: u32 = 0x4000_0000;
    let stmt = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code, k, jt, jf| sock_filter { code, jt, jf, k };
    const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
    vec![
        stmt(LOAD_NR, 0), // seccomp_data.nr
        jump(JSET, X32_BIT, 3, 0),
        jump(JEQ, libc::SYS_clone3 as u32, 1, 0),
        stmt(JA, 2), // not ours: continue after the prefix
        stmt(RET, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        stmt(RET, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ]
}

/// The whole program, compiled once per sandbox in the supervisor (before any fork).
pub struct CompiledFilters {
    pub program: BpfProgram,
}

impl CompiledFilters {
    /// The program with `extra` syscall numbers denied too (a policy's additions).
    pub fn build_with(extra: &[i64]) -> Result<Self, seccompiler::BackendError> {
        let mut program = build_abi_prefix();
        program.extend(build_filter_with(extra)?);
        Ok(CompiledFilters { program })
    }

    /// Installs the filter on the calling thread (sets no_new_privs first).
    pub fn apply(&self) -> Result<(), seccompiler::Error> {
        seccompiler::apply_filter(&self.program)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_denials_extend_the_program_by_name() {
        let base = build_filter_with(&[]).unwrap().len();
        let connect = deniable_syscall("connect").unwrap();
        assert!(build_filter_with(&[connect]).unwrap().len() > base);
        assert_eq!(deniable_syscall("ptrace"), Some(libc::SYS_ptrace));
        assert_eq!(deniable_syscall("no_such_call"), None);
    }

    #[test]
    fn filter_compiles_and_covers_the_issue_list() {
        let prog = build_filter_with(&[]).expect("filter compiles");
        assert!(prog.len() > DENIED_SYSCALLS.len());
        for name in [
            "init_module",
            "kexec_load",
            "reboot",
            "bpf",
            "perf_event_open",
            "keyctl",
            "add_key",
            "ptrace",
            "mount",
            "umount2",
            "pivot_root",
            "userfaultfd",
            "open_by_handle_at",
            "swapon",
            "setns",
        ] {
            assert!(
                DENIED_SYSCALLS.iter().any(|(n, _)| *n == name),
                "{name} must be denied"
            );
        }
    }

    #[test]
    fn abi_prefix_jumps_land_inside_the_program() {
        let prog = CompiledFilters::build_with(&[]).unwrap().program;
        for (i, insn) in prog.iter().enumerate() {
            if insn.code & libc::BPF_JMP as u16 != 0 && insn.code & 0x07 == libc::BPF_JMP as u16 {
                assert!(i + 1 + (insn.jt as usize) < prog.len());
                assert!(i + 1 + (insn.jf as usize) < prog.len());
            }
        }
    }
}
