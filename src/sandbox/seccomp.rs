//! The builder's seccomp filter, as Nix's `setupSeccomp`, written as a
//! classic BPF program by hand (no libseccomp):
//!
//! - `chmod`, `fchmod`, `fchmodat`, `fchmodat2` with `S_ISUID` or `S_ISGID`
//!   in the mode fail with `EPERM`: a build must not make setuid files;
//! - the `getxattr`/`setxattr`/`listxattr` families fail with `ENOTSUP`:
//!   outputs carry no extended attributes (as Nix; `removexattr` passes);
//! - `add_key`, `request_key` and `keyctl` fail with `ENOSYS`: the kernel
//!   keyring is not namespaced, so a build could otherwise read, add and
//!   clear keys in keyrings it reaches (the session keyring it was started
//!   in, its build user's user keyring, which outlives the build and is
//!   found by the next build of that uid), as Docker and Flatpak refuse
//!   them. `ENOSYS` rather than Docker's `EPERM`: it reads as a kernel built
//!   without `CONFIG_KEYS`, an ordinary configuration that programs and
//!   test suites (keyutils users, Kerberos' keyring cache, Python's tests)
//!   detect and fall back from, where `EPERM` reads as a real failure;
//! - everything else is allowed.
//!
//! Every ABI a process can use on the host is covered, or `int 0x80` on
//! x86-64 would bypass the filter: x86-64 (with x32, whose numbers are the
//! x86-64 ones plus bit 30), i386, aarch64 and 32-bit ARM. Other
//! architectures get an allow-all program. This is hardening, not the
//! boundary: `open(O_CREAT, 04755)` is not filtered (as in Nix), the mounts
//! are `nosuid` and the outputs are canonicalised after the build.

use std::collections::BTreeMap;

/// One classic BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFilter {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
const BPF_ALU_AND_K: u16 = 0x04 | 0x50; // BPF_ALU | BPF_AND | BPF_K
const BPF_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JGT_K: u16 = 0x05 | 0x20; // BPF_JMP | BPF_JGT | BPF_K
const BPF_JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
const BPF_JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K

/// `SECCOMP_RET_ALLOW`.
pub const RET_ALLOW: u32 = 0x7fff_0000;
/// `SECCOMP_RET_ERRNO` (the errno goes in the low 16 bits).
pub const RET_ERRNO: u32 = 0x0005_0000;

/// `AUDIT_ARCH_X86_64`.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `AUDIT_ARCH_I386`.
pub const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// `AUDIT_ARCH_AARCH64`.
pub const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
/// `AUDIT_ARCH_ARM`.
pub const AUDIT_ARCH_ARM: u32 = 0x4000_0028;

/// The x32 ABI's syscall-number bit.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// Low 32 bits of `args[i]` (little-endian).
const fn off_arg(i: u32) -> u32 {
    16 + 8 * i
}

/// Syscall numbers of one ABI.
struct Abi {
    arch: u32,
    /// Strip the x32 bit before comparing.
    x32: bool,
    /// (number, index of the mode argument).
    chmods: &'static [(u32, u32)],
    /// Inclusive ranges of the xattr calls.
    xattrs: &'static [(u32, u32)],
    /// `add_key`, `request_key`, `keyctl`.
    keys: [u32; 3],
}

// getxattrat/setxattrat/listxattrat (kernel 6.13) have the same numbers everywhere.
const XATTR_AT: (u32, u32) = (463, 465);

const ABIS: [Abi; 4] = [
    Abi {
        arch: AUDIT_ARCH_X86_64,
        x32: true,
        chmods: &[(90, 1), (91, 1), (268, 2), (452, 2)],
        xattrs: &[(188, 196), XATTR_AT],
        keys: [248, 249, 250],
    },
    Abi {
        arch: AUDIT_ARCH_I386,
        x32: false,
        chmods: &[(15, 1), (94, 1), (306, 2), (452, 2)],
        xattrs: &[(226, 234), XATTR_AT],
        keys: [286, 287, 288],
    },
    Abi {
        arch: AUDIT_ARCH_AARCH64,
        x32: false,
        chmods: &[(52, 1), (53, 2), (452, 2)],
        xattrs: &[(5, 13), XATTR_AT],
        keys: [217, 218, 219],
    },
    Abi {
        arch: AUDIT_ARCH_ARM,
        x32: false,
        chmods: &[(15, 1), (94, 1), (333, 2), (452, 2)],
        xattrs: &[(226, 234), XATTR_AT],
        keys: [309, 310, 311],
    },
];

/// A jump target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Label {
    Abi(usize),
    Arg(u32),
    Allow,
    Eperm,
    Enotsup,
    Enosys,
}

/// A tiny assembler: forward jumps by label, resolved at the end.
#[derive(Default)]
struct Asm {
    code: Vec<SockFilter>,
    /// (instruction, label for jt, label for jf).
    fixups: Vec<(usize, Option<Label>, Option<Label>)>,
    labels: BTreeMap<Label, usize>,
}

impl Asm {
    fn op(&mut self, code: u16, k: u32) {
        self.code.push(SockFilter {
            code,
            jt: 0,
            jf: 0,
            k,
        });
    }
    fn jump(&mut self, code: u16, k: u32, jt: Option<Label>, jf: Option<Label>) {
        self.fixups.push((self.code.len(), jt, jf));
        self.op(code, k);
    }
    fn label(&mut self, l: Label) {
        self.labels.insert(l, self.code.len());
    }
    fn finish(mut self) -> Vec<SockFilter> {
        for (at, jt, jf) in std::mem::take(&mut self.fixups) {
            let rel = |l: Label| {
                let target = self.labels[&l];
                u8::try_from(target - at - 1).expect("seccomp program small enough for 8-bit jumps")
            };
            if let Some(l) = jt {
                self.code[at].jt = rel(l);
            }
            if let Some(l) = jf {
                self.code[at].jf = rel(l);
            }
        }
        self.code
    }
}

/// The filter program (see the module docs).
pub fn build_filter() -> Vec<SockFilter> {
    let mut a = Asm::default();
    a.op(BPF_LD_W_ABS, OFF_ARCH);
    for (i, abi) in ABIS.iter().enumerate() {
        a.jump(BPF_JEQ_K, abi.arch, Some(Label::Abi(i)), None);
    }
    a.op(BPF_RET_K, RET_ALLOW);
    for (i, abi) in ABIS.iter().enumerate() {
        a.label(Label::Abi(i));
        a.op(BPF_LD_W_ABS, OFF_NR);
        if abi.x32 {
            a.op(BPF_ALU_AND_K, !X32_SYSCALL_BIT);
        }
        for &(nr, arg) in abi.chmods {
            a.jump(BPF_JEQ_K, nr, Some(Label::Arg(arg)), None);
        }
        for nr in abi.keys {
            a.jump(BPF_JEQ_K, nr, Some(Label::Enosys), None);
        }
        for &(lo, hi) in abi.xattrs {
            // lo <= nr <= hi: JGE lo falls through to JGT hi, else skips it;
            // JGT hi false means in range.
            a.jump(BPF_JGE_K, lo, None, None);
            let at = a.code.len() - 1;
            a.code[at].jf = 1;
            a.jump(BPF_JGT_K, hi, None, Some(Label::Enotsup));
        }
        a.op(BPF_RET_K, RET_ALLOW);
    }
    for arg in [1, 2] {
        a.label(Label::Arg(arg));
        a.op(BPF_LD_W_ABS, off_arg(arg));
        a.jump(
            BPF_JSET_K,
            libc::S_ISUID | libc::S_ISGID,
            Some(Label::Eperm),
            Some(Label::Allow),
        );
    }
    a.label(Label::Allow);
    a.op(BPF_RET_K, RET_ALLOW);
    a.label(Label::Eperm);
    a.op(BPF_RET_K, RET_ERRNO | libc::EPERM as u32);
    a.label(Label::Enotsup);
    a.op(BPF_RET_K, RET_ERRNO | libc::ENOTSUP as u32);
    a.label(Label::Enosys);
    a.op(BPF_RET_K, RET_ERRNO | libc::ENOSYS as u32);
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program over a `seccomp_data`, as the kernel does
    /// (only the instructions the builder uses).
    fn run(prog: &[SockFilter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend_from_slice(&nr.to_le_bytes());
        data.extend_from_slice(&arch.to_le_bytes());
        data.extend_from_slice(&0u64.to_le_bytes());
        for a in args {
            data.extend_from_slice(&a.to_le_bytes());
        }
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = prog[pc];
            pc += 1;
            let jump = |cond: bool| if cond { i.jt as usize } else { i.jf as usize };
            match i.code {
                BPF_LD_W_ABS => {
                    let o = i.k as usize;
                    acc = u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
                }
                BPF_ALU_AND_K => acc &= i.k,
                BPF_JEQ_K => pc += jump(acc == i.k),
                BPF_JGT_K => pc += jump(acc > i.k),
                BPF_JGE_K => pc += jump(acc >= i.k),
                BPF_JSET_K => pc += jump(acc & i.k != 0),
                BPF_RET_K => return i.k,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    const EPERM: u32 = RET_ERRNO | libc::EPERM as u32;
    const ENOTSUP: u32 = RET_ERRNO | libc::ENOTSUP as u32;

    fn args(i: usize, mode: u64) -> [u64; 6] {
        let mut a = [0; 6];
        a[i] = mode;
        a
    }

    #[test]
    fn setuid_and_setgid_chmods_are_refused_on_every_abi() {
        let p = build_filter();
        for abi in &ABIS {
            for &(nr, arg) in abi.chmods {
                let arg = arg as usize;
                for mode in [0o4755, 0o2755, 0o6755, 0o104755] {
                    assert_eq!(
                        run(&p, abi.arch, nr, args(arg, mode)),
                        EPERM,
                        "{:#x} {nr} {mode:o}",
                        abi.arch
                    );
                }
                for mode in [0o755, 0o1777, 0o644, 0] {
                    assert_eq!(
                        run(&p, abi.arch, nr, args(arg, mode)),
                        RET_ALLOW,
                        "{:#x} {nr} {mode:o}",
                        abi.arch
                    );
                }
                // The mode is read from the right argument only.
                let other = if arg == 1 { 2 } else { 1 };
                assert_eq!(run(&p, abi.arch, nr, args(other, 0o4755)), RET_ALLOW);
            }
        }
    }

    #[test]
    fn x32_numbers_are_filtered_too() {
        let p = build_filter();
        assert_eq!(
            run(&p, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 90, args(1, 0o4755)),
            EPERM
        );
        assert_eq!(
            run(&p, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 191, [0; 6]),
            ENOTSUP
        );
    }

    #[test]
    fn xattr_calls_fail_with_enotsup_and_neighbours_pass() {
        let p = build_filter();
        for abi in &ABIS {
            for &(lo, hi) in abi.xattrs {
                for nr in lo..=hi {
                    assert_eq!(
                        run(&p, abi.arch, nr, [0; 6]),
                        ENOTSUP,
                        "{:#x} {nr}",
                        abi.arch
                    );
                }
                assert_eq!(
                    run(&p, abi.arch, lo - 1, [0; 6]),
                    RET_ALLOW,
                    "{:#x} {}",
                    abi.arch,
                    lo - 1
                );
                assert_eq!(
                    run(&p, abi.arch, hi + 1, [0; 6]),
                    RET_ALLOW,
                    "{:#x} {}",
                    abi.arch,
                    hi + 1
                );
            }
        }
        // x86-64 removexattr (197) is allowed, as in Nix.
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, 197, [0; 6]), RET_ALLOW);
    }

    const ENOSYS: u32 = RET_ERRNO | libc::ENOSYS as u32;

    #[test]
    fn keyring_calls_fail_with_enosys_on_every_abi() {
        let p = build_filter();
        // The numbers, from each ABI's syscall table (add_key, request_key, keyctl).
        let expected = [
            (AUDIT_ARCH_X86_64, [248, 249, 250]),
            (AUDIT_ARCH_I386, [286, 287, 288]),
            (AUDIT_ARCH_AARCH64, [217, 218, 219]),
            (AUDIT_ARCH_ARM, [309, 310, 311]),
        ];
        for (arch, nrs) in expected {
            for nr in nrs {
                for a in [[0; 6], [u64::MAX; 6], args(0, 1)] {
                    assert_eq!(run(&p, arch, nr, a), ENOSYS, "{arch:#x} {nr}");
                }
            }
            assert_eq!(run(&p, arch, nrs[0] - 1, [0; 6]), RET_ALLOW, "{arch:#x}");
            assert_eq!(run(&p, arch, nrs[2] + 1, [0; 6]), RET_ALLOW, "{arch:#x}");
        }
        // x32: the x86-64 numbers with bit 30.
        for nr in [248, 249, 250] {
            assert_eq!(
                run(&p, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | nr, [0; 6]),
                ENOSYS
            );
        }
        // The host's own numbers agree with the table.
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            [libc::SYS_add_key, libc::SYS_request_key, libc::SYS_keyctl],
            [248, 249, 250]
        );
    }

    #[test]
    fn ordinary_syscalls_and_unknown_arches_are_allowed() {
        let p = build_filter();
        for nr in [0, 1, 2, 59, 60, 231, 257] {
            assert_eq!(
                run(&p, AUDIT_ARCH_X86_64, nr, args(1, 0o4755)),
                RET_ALLOW,
                "{nr}"
            );
        }
        assert_eq!(run(&p, 0xdead_beef, 90, args(1, 0o4755)), RET_ALLOW);
    }

    #[test]
    fn program_fits_the_kernel_limits() {
        let p = build_filter();
        assert!(p.len() < 4096);
        assert_eq!(p.last().map(|i| i.code), Some(BPF_RET_K));
    }
}
