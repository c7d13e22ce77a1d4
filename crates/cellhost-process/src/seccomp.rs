//! The default seccomp filter every process cell runs under.
//!
//! A shared-kernel cell's real boundary is the kernel's attack surface, so
//! on top of namespaces, the OCI default capability set and
//! no_new_privileges, each workload gets a deny-list filter (Docker's
//! default profile is the model; a deny list keeps ordinary programs
//! working):
//!
//! - kernel keyrings (`add_key`, `keyctl`, `request_key`), `bpf`,
//!   `perf_event_open`, `userfaultfd`, io_uring: large, often-exploited
//!   interfaces no cell workload needs;
//! - modules, kexec, reboot, swap, accounting, clocks, syslog, quotas,
//!   `iopl`/`ioperm`, file handles (`open_by_handle_at` escapes mount
//!   namespaces: CVE "shocker");
//! - every mount API, `unshare`, `setns`, and `clone` with CLONE_NEWUSER:
//!   a user namespace would give the workload a fresh set of capabilities
//!   over new namespaces, the usual first step of a kernel exploit;
//! - `clone3` answers ENOSYS (its flags live in memory a filter cannot
//!   read), so libc falls back to `clone`, which the filter can check.
//!
//! Denied calls fail with EPERM. Syscalls of any other architecture (i386
//! `int 0x80`) kill the process — seccompiler's architecture check — and
//! x32-ABI numbers on x86_64 fail with ENOSYS, so neither can be used to
//! call a denied syscall by another number.
//!
//! The filter is installed by the cell's init process right before it
//! execs the workload (see `executor`), after no_new_privileges is set, so
//! it needs no privilege and is inherited by everything the workload runs.
//! A filter that fails to build or load fails the create: never a cell
//! without it.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// Syscalls no cell may make (x86_64 numbers from libc).
const DENIED: &[i64] = &[
    libc::SYS_add_key,
    libc::SYS_keyctl,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_syslog,
    libc::SYS_quotactl,
    libc::SYS_lookup_dcookie,
    libc::SYS_vhangup,
    libc::SYS_uselib,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
];

/// Syscall numbers at or above this are the x32 ABI.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// `offsetof(struct seccomp_data, nr)`.
const SECCOMP_DATA_NR: u32 = 0;

#[derive(Debug, thiserror::Error)]
#[error("seccomp filter: {0}")]
pub struct SeccompError(String);

fn err(e: impl std::fmt::Display) -> SeccompError {
    SeccompError(e.to_string())
}

fn target() -> Result<TargetArch, SeccompError> {
    std::env::consts::ARCH.try_into().map_err(err)
}

/// The deny-list program (EPERM), with the x32 guard spliced in after the
/// architecture check.
pub fn deny_program() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|nr| (*nr, vec![])).collect();
    let new_user = libc::CLONE_NEWUSER as u64;
    rules.insert(
        libc::SYS_clone,
        vec![
            SeccompRule::new(vec![
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(new_user),
                    new_user,
                )
                .map_err(err)?,
            ])
            .map_err(err)?,
        ],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target()?,
    )
    .map_err(err)?;
    let mut prog: BpfProgram = filter.try_into().map_err(err)?;
    // seccompiler's program starts with a 3-instruction architecture check
    // whose success jumps to index 3. Insert there: load nr; if nr >= x32
    // bit return ENOSYS; else fall through to the rules.
    let guard = [
        sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: SECCOMP_DATA_NR,
        },
        sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
    ];
    if prog.len() < 3 {
        return Err(SeccompError("unexpected program shape".into()));
    }
    prog.splice(3..3, guard);
    Ok(prog)
}

/// `clone3` answers ENOSYS.
pub fn clone3_program() -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, vec![])].into();
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        target()?,
    )
    .map_err(err)?
    .try_into()
    .map_err(err)
}

/// Both programs of the default filter.
pub fn default_programs() -> Result<[BpfProgram; 2], SeccompError> {
    Ok([deny_program()?, clone3_program()?])
}

/// Install programs on the calling thread (inherited across execve). Sets
/// no_new_privileges; allocates nothing, so it is safe after fork.
pub fn apply(programs: &[BpfProgram]) -> Result<(), SeccompError> {
    for p in programs {
        seccompiler::apply_filter(p).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_build_and_guard_sits_after_arch_check() {
        let p = deny_program().unwrap();
        assert!(
            p.len() > DENIED.len(),
            "one jump per denied syscall at least"
        );
        // The arch check's success jump (jt=1 at index 1) lands on index 3:
        // our guard's load of the syscall number.
        assert_eq!(p[1].jt, 1);
        assert_eq!(p[3].k, SECCOMP_DATA_NR);
        assert_eq!(p[4].k, X32_SYSCALL_BIT);
        assert_eq!(p[5].k, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
        assert!(p.len() < 4096, "BPF_MAXINSNS");
        clone3_program().unwrap();
    }

    #[test]
    fn filter_denies_in_a_child_and_nothing_else() {
        // Build in the parent, apply in a forked child so the test process
        // stays unfiltered.
        let programs = default_programs().unwrap();
        // SAFETY: the child allocates nothing: it only makes raw syscalls
        // and _exits (the test harness is multi-threaded).
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = (|| {
                    if apply(&programs).is_err() {
                        return 11;
                    }
                    // keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0)
                    // SAFETY: raw syscalls with integer arguments only.
                    let r = unsafe { libc::syscall(libc::SYS_keyctl, 0, -3i64, 0) };
                    if r != -1 || nix::errno::Errno::last() != nix::errno::Errno::EPERM {
                        return 12;
                    }
                    // SAFETY: as above; unshare of a user namespace.
                    let r = unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) };
                    if r != -1 || nix::errno::Errno::last() != nix::errno::Errno::EPERM {
                        return 13;
                    }
                    // SAFETY: as above; clone3 with a null args pointer.
                    let r = unsafe { libc::syscall(libc::SYS_clone3, 0, 0) };
                    if r != -1 || nix::errno::Errno::last() != nix::errno::Errno::ENOSYS {
                        return 14;
                    }
                    // An x32-ABI number for keyctl.
                    // SAFETY: as above.
                    let r = unsafe {
                        libc::syscall(libc::SYS_keyctl | X32_SYSCALL_BIT as i64, 0, -3i64, 0)
                    };
                    if r != -1 || nix::errno::Errno::last() != nix::errno::Errno::ENOSYS {
                        return 15;
                    }
                    // Ordinary calls still work.
                    // SAFETY: getpid has no arguments.
                    if unsafe { libc::syscall(libc::SYS_getpid) } <= 0 {
                        return 16;
                    }
                    0
                })();
                // SAFETY: _exit is async-signal-safe and ends the child.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    st,
                    nix::sys::wait::WaitStatus::Exited(child, 0),
                    "child check failed"
                );
            }
        }
    }
}
