//! The seccomp-BPF filter applied to every sandboxed command.
//!
//! A deny list (allow by default) of syscalls that reach kernel attack surface a sandboxed program has no
//! business with, answered with EPERM so programs that probe features degrade gracefully. The program is
//! seccompiler's, with a hand-written prefix that refuses the x32 ABI (syscall numbers with bit 30 set,
//! which seccompiler's per-number rules cannot express and which would otherwise bypass the list), answers
//! clone3 with ENOSYS, and lets `socket(2)`/`socketpair(2)` create only the address families a sandbox
//! needs ([`ALLOWED_SOCKET_FAMILIES`]; netlink only for `NETLINK_ROUTE`, which `ip` uses): anything else
//! — AF_VSOCK, which no network namespace scopes, AF_PACKET, and every module-autoloaded family — fails
//! with EAFNOSUPPORT, as on a kernel without it. seccompiler cannot express that, since a filter has one
//! error for all its rules. One filter, because the kernel validates and JITs every filter at every launch
//! (docs/benchmarks.md).

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

/// The numbers of a spec's `denied_syscalls`, or the first name that is not a deniable syscall.
pub fn denied_syscall_numbers(names: &[String]) -> Result<Vec<i64>, crate::sandbox::PrepareError> {
    names
        .iter()
        .map(|name| {
            deniable_syscall(name).ok_or_else(|| {
                crate::sandbox::PrepareError::Seccomp(format!("unknown syscall '{name}' in denied_syscalls"))
            })
        })
        .collect()
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

/// The address families `socket(2)` and `socketpair(2)` may create in a sandbox: local sockets, IPv4,
/// IPv6 and (for `NETLINK_ROUTE` only) netlink. [`build_prefix`] encodes exactly these; the tests check
/// both against each other.
pub const ALLOWED_SOCKET_FAMILIES: &[(&str, i32)] = &[
    ("AF_UNIX", libc::AF_UNIX),
    ("AF_INET", libc::AF_INET),
    ("AF_INET6", libc::AF_INET6),
    ("AF_NETLINK", libc::AF_NETLINK),
];

/// Offsets in `struct seccomp_data`: nr, arch, then (after the instruction pointer) six 64-bit arguments;
/// on little-endian x86_64 an argument's low 32 bits (an `int` such as a family) come first.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARG0_LOW: u32 = 16;
const DATA_ARG2_LOW: u32 = 32;

/// The prefix, in this order: a syscall of another architecture falls through to seccompiler's arch check
/// (which kills); every x32-ABI syscall → EPERM; clone3 → ENOSYS (libc falls back to clone, whose flags
/// the main rules inspect); `socket`/`socketpair` of a family outside [`ALLOWED_SOCKET_FAMILIES`] (or
/// netlink other than `NETLINK_ROUTE`) → EAFNOSUPPORT. Anything else falls through to the instruction
/// after the prefix, so prepending it leaves the relative jumps of the program after it intact.
pub fn build_prefix() -> BpfProgram {
    const LOAD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const X32_BIT: u32 = 0x4000_0000;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let errno = |code: i32| libc::SECCOMP_RET_ERRNO | code as u32;
    let stmt = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code, k, jt, jf| sock_filter { code, jt, jf, k };
    let family = |af: i32| af as u32;
    // Instruction numbers, for the jumps (each offset is counted from the next instruction).
    const FAMILY: u8 = 8;
    const PROTOCOL: u8 = 13;
    const REFUSE_FAMILY: u8 = 15;
    const ENOSYS: u8 = 16;
    const EPERM: u8 = 17;
    const END: u8 = 18;
    let to = |from: u8, target: u8| target - from - 1;
    let program = vec![
        stmt(LOAD, DATA_ARCH),
        jump(JEQ, AUDIT_ARCH_X86_64, 0, to(1, END)),
        stmt(LOAD, DATA_NR),
        jump(JSET, X32_BIT, to(3, EPERM), 0),
        jump(JEQ, libc::SYS_clone3 as u32, to(4, ENOSYS), 0),
        jump(JEQ, libc::SYS_socket as u32, to(5, FAMILY), 0),
        jump(JEQ, libc::SYS_socketpair as u32, to(6, FAMILY), 0),
        stmt(JA, u32::from(to(7, END))),
        // FAMILY
        stmt(LOAD, DATA_ARG0_LOW),
        jump(JEQ, family(libc::AF_UNIX), to(9, END), 0),
        jump(JEQ, family(libc::AF_INET), to(10, END), 0),
        jump(JEQ, family(libc::AF_INET6), to(11, END), 0),
        jump(JEQ, family(libc::AF_NETLINK), 0, to(12, REFUSE_FAMILY)),
        // PROTOCOL
        stmt(LOAD, DATA_ARG2_LOW),
        jump(JEQ, libc::NETLINK_ROUTE as u32, to(14, END), 0),
        // REFUSE_FAMILY
        stmt(RET, errno(libc::EAFNOSUPPORT)),
        stmt(RET, errno(libc::ENOSYS)),
        stmt(RET, errno(libc::EPERM)),
    ];
    debug_assert_eq!(program.len(), usize::from(END));
    debug_assert_eq!(program[usize::from(FAMILY)], stmt(LOAD, DATA_ARG0_LOW));
    debug_assert_eq!(program[usize::from(PROTOCOL)], stmt(LOAD, DATA_ARG2_LOW));
    program
}

/// The whole program, compiled once per sandbox in the supervisor (before any fork).
pub struct CompiledFilters {
    pub program: BpfProgram,
}

impl CompiledFilters {
    /// The program with `extra` syscall numbers denied too (a policy's additions).
    pub fn build_with(extra: &[i64]) -> Result<Self, seccompiler::BackendError> {
        let mut program = build_prefix();
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

    /// Runs `program` on one `seccomp_data` as the kernel would (the instructions our filters use).
    fn run(program: &[sock_filter], nr: i64, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, arg) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&arg.to_le_bytes());
        }
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let insn = &program[pc];
            pc += 1;
            let code = u32::from(insn.code);
            match code & 0x07 {
                libc::BPF_LD => {
                    assert_eq!(code, libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, "load {code:#x}");
                    let at = insn.k as usize;
                    a = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                }
                libc::BPF_ALU => {
                    assert_eq!(code, libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, "alu {code:#x}");
                    a &= insn.k;
                }
                libc::BPF_JMP => {
                    let taken = match code & 0xf0 {
                        libc::BPF_JA => {
                            pc += insn.k as usize;
                            continue;
                        }
                        libc::BPF_JEQ => a == insn.k,
                        libc::BPF_JGT => a > insn.k,
                        libc::BPF_JGE => a >= insn.k,
                        libc::BPF_JSET => a & insn.k != 0,
                        other => panic!("jump {other:#x}"),
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
                libc::BPF_RET => return insn.k,
                other => panic!("instruction class {other:#x}"),
            }
        }
    }

    const X86_64: u32 = 0xc000_003e;

    fn verdict(nr: i64, args: [u64; 6]) -> u32 {
        let program = CompiledFilters::build_with(&[]).unwrap().program;
        run(&program, nr, X86_64, args)
    }

    fn socket_verdicts(family: i32, protocol: u64) -> [u32; 2] {
        let args = [family as u64, libc::SOCK_STREAM as u64, protocol, 0, 0, 0];
        [
            verdict(libc::SYS_socket, args),
            verdict(libc::SYS_socketpair, args),
        ]
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EAFNOSUPPORT: u32 = libc::SECCOMP_RET_ERRNO | libc::EAFNOSUPPORT as u32;

    #[test]
    fn test_sockets_of_other_families_are_refused_with_eafnosupport() {
        for family in [
            libc::AF_VSOCK,
            libc::AF_PACKET,
            libc::AF_BLUETOOTH,
            libc::AF_ALG,
            libc::AF_XDP,
        ] {
            assert_eq!(socket_verdicts(family, 0), [EAFNOSUPPORT; 2], "family {family}");
        }
        assert_eq!(
            socket_verdicts(libc::AF_NETLINK, libc::NETLINK_AUDIT as u64),
            [EAFNOSUPPORT; 2]
        );
    }

    #[test]
    fn test_sockets_of_the_allowed_families_pass_to_the_main_rules() {
        for (name, family) in ALLOWED_SOCKET_FAMILIES {
            assert_eq!(socket_verdicts(*family, 0), [ALLOW; 2], "{name}");
        }
        // The kernel reads the family as an int: high bits do not change it.
        let high = (1u64 << 32) | libc::AF_VSOCK as u64;
        assert_eq!(verdict(libc::SYS_socket, [high, 1, 0, 0, 0, 0]), EAFNOSUPPORT);
    }

    #[test]
    fn test_the_prefix_keeps_x32_clone3_and_the_deny_list_and_leaves_other_arches_to_the_arch_check() {
        let program = CompiledFilters::build_with(&[]).unwrap().program;
        let errno = |e: i32| libc::SECCOMP_RET_ERRNO | e as u32;
        assert_eq!(verdict(libc::SYS_clone3, [0; 6]), errno(libc::ENOSYS));
        assert_eq!(verdict(libc::SYS_read | 0x4000_0000, [0; 6]), errno(libc::EPERM));
        assert_eq!(verdict(libc::SYS_ptrace, [0; 6]), errno(libc::EPERM));
        assert_eq!(verdict(libc::SYS_read, [0; 6]), ALLOW);
        const I386: u32 = 0x4000_0003;
        assert_eq!(
            run(&program, libc::SYS_socket, I386, [40, 1, 0, 0, 0, 0]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
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
