//! The init of a service sandbox without a main command: a static x86-64 executable of a few bytes, written
//! into the bundle and mounted read-only at [`super::bundle::INIT_PATH`]. It needs nothing from the root
//! (any image works), blocks every signal it can (so a `runsc kill --all TERM` for a graceful stop leaves
//! it running, and only SIGKILL ends it), and reaps every child reparented to it, sleeping in
//! `rt_sigtimedwait` for SIGCHLD when it has none.

/// The machine code (position independent), assembled from:
///
/// ```text
///   mov eax, 14; xor edi, edi; lea rsi, [rip+all]; xor edx, edx; mov r10d, 8; syscall  ; block all
/// 1:mov eax, 61; mov rdi, -1; xor esi, esi; xor edx, edx; xor r10d, r10d; syscall      ; wait4(-1)
///   test rax, rax; jns 1b
///   mov eax, 128; lea rdi, [rip+chld]; xor esi, esi; xor edx, edx; mov r10d, 8; syscall ; sigtimedwait
///   jmp 1b
/// all: .quad -1
/// chld: .quad 1 << 16                                                                   ; SIGCHLD
/// ```
const CODE: [u8; 92] = [
    0xb8, 0x0e, 0x00, 0x00, 0x00, 0x31, 0xff, 0x48, 0x8d, 0x35, 0x3e, 0x00, 0x00, 0x00, 0x31, 0xd2, 0x41,
    0xba, 0x08, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xb8, 0x3d, 0x00, 0x00, 0x00, 0x48, 0xc7, 0xc7, 0xff, 0xff,
    0xff, 0xff, 0x31, 0xf6, 0x31, 0xd2, 0x45, 0x31, 0xd2, 0x0f, 0x05, 0x48, 0x85, 0xc0, 0x79, 0xe6, 0xb8,
    0x80, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x3d, 0x16, 0x00, 0x00, 0x00, 0x31, 0xf6, 0x31, 0xd2, 0x41, 0xba,
    0x08, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xeb, 0xcc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00,
    0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00,
];

const BASE: u64 = 0x40_0000;
const EHDR: usize = 64;
const PHDR: usize = 56;

/// The executable: an ELF64 header, one loadable segment (read + execute) and the code.
pub fn executable() -> Vec<u8> {
    let total = (EHDR + PHDR + CODE.len()) as u64;
    let mut elf = Vec::with_capacity(total as usize);
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&(BASE + (EHDR + PHDR) as u64).to_le_bytes()); // entry
    elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    elf.extend_from_slice(&(EHDR as u16).to_le_bytes());
    elf.extend_from_slice(&(PHDR as u16).to_le_bytes());
    elf.extend_from_slice(&1u16.to_le_bytes()); // phnum
    elf.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // PF_R | PF_X
    elf.extend_from_slice(&0u64.to_le_bytes()); // offset
    elf.extend_from_slice(&BASE.to_le_bytes()); // vaddr
    elf.extend_from_slice(&BASE.to_le_bytes()); // paddr
    elf.extend_from_slice(&total.to_le_bytes()); // filesz
    elf.extend_from_slice(&total.to_le_bytes()); // memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // align
    elf.extend_from_slice(&CODE);
    elf
}

/// Whether this build has an init for the host's architecture.
pub const AVAILABLE: bool = cfg!(target_arch = "x86_64");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_init_is_a_well_formed_elf_whose_entry_is_its_code() {
        let elf = executable();
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf.len(), EHDR + PHDR + CODE.len());
        let entry = u64::from_le_bytes(elf[24..32].try_into().expect("8 bytes"));
        assert_eq!(entry, BASE + (EHDR + PHDR) as u64);
        assert_eq!(&elf[EHDR + PHDR..], &CODE);
    }
}
