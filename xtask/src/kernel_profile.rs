//! `cargo xtask kernel-profile <VERSION> -- <COMMAND>...`: run a command as if on an older kernel.
//!
//! Installs a seccomp filter (with `no_new_privs`, so no privilege is needed) under which every
//! system call that kernel `VERSION` does not have answers `ENOSYS` — exactly what that kernel
//! answers for a number it does not know — and then `exec`s the command. The filter is
//! inherited by every thread and child the command creates and survives further `exec`s, so
//! `kernel-profile 5.4 -- cargo nextest run ...` runs cargo, every test binary and every process
//! those spawn (the confined apply child, `graphctl` in the CLI tests) as on 5.4.
//!
//! Only the system call *numbers* are checked: a call that exists but gained a flag later (for
//! example `clone3` flags, `statx` masks) is still answered by the real kernel. Every number
//! here is from the unified table (424 and up, the same on every architecture since Linux
//! 5.1), so one list serves x86_64 and aarch64. Calls that predate 5.1 exist on every profile.
//!
//! The filter is built with `seccompiler` (rust-vmm, pure Rust: it needs no libseccomp from the
//! system and compiles straight to classic BPF).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{Context, Result, bail};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Every system call newer than Linux 5.1: (name, number in the unified table, the first
/// kernel that has it).
pub const NEWER_SYSCALLS: &[(&str, i64, (u32, u32))] = &[
    ("open_tree", 428, (5, 2)),
    ("move_mount", 429, (5, 2)),
    ("fsopen", 430, (5, 2)),
    ("fsconfig", 431, (5, 2)),
    ("fsmount", 432, (5, 2)),
    ("fspick", 433, (5, 2)),
    ("pidfd_open", 434, (5, 3)),
    ("clone3", 435, (5, 3)),
    ("close_range", 436, (5, 9)),
    ("openat2", 437, (5, 6)),
    ("pidfd_getfd", 438, (5, 6)),
    ("faccessat2", 439, (5, 8)),
    ("process_madvise", 440, (5, 10)),
    ("epoll_pwait2", 441, (5, 11)),
    ("mount_setattr", 442, (5, 12)),
    ("quotactl_fd", 443, (5, 14)),
    ("landlock_create_ruleset", 444, (5, 13)),
    ("landlock_add_rule", 445, (5, 13)),
    ("landlock_restrict_self", 446, (5, 13)),
    ("memfd_secret", 447, (5, 14)),
    ("process_mrelease", 448, (5, 15)),
    ("futex_waitv", 449, (5, 16)),
    ("set_mempolicy_home_node", 450, (5, 17)),
    ("cachestat", 451, (6, 5)),
    ("fchmodat2", 452, (6, 6)),
    ("map_shadow_stack", 453, (6, 6)),
    ("futex_wake", 454, (6, 7)),
    ("futex_wait", 455, (6, 7)),
    ("futex_requeue", 456, (6, 7)),
    ("statmount", 457, (6, 8)),
    ("listmount", 458, (6, 8)),
    ("lsm_get_self_attr", 459, (6, 8)),
    ("lsm_set_self_attr", 460, (6, 8)),
    ("lsm_list_modules", 461, (6, 8)),
    ("mseal", 462, (6, 10)),
    ("setxattrat", 463, (6, 13)),
    ("getxattrat", 464, (6, 13)),
    ("listxattrat", 465, (6, 13)),
    ("removexattrat", 466, (6, 13)),
    ("open_tree_attr", 467, (6, 15)),
    ("file_getattr", 468, (6, 17)),
    ("file_setattr", 469, (6, 17)),
];

/// Parses `"5.4"` into `(5, 4)`.
pub fn parse_version(v: &str) -> Result<(u32, u32)> {
    let (major, minor) = v
        .split_once('.')
        .with_context(|| format!("kernel profile {v:?}: expected MAJOR.MINOR, e.g. 5.4"))?;
    Ok((
        major
            .parse()
            .with_context(|| format!("kernel profile {v:?}: bad major"))?,
        minor
            .parse()
            .with_context(|| format!("kernel profile {v:?}: bad minor"))?,
    ))
}

/// The system calls a kernel of `version` lacks.
pub fn missing(version: (u32, u32)) -> Vec<(&'static str, i64)> {
    NEWER_SYSCALLS
        .iter()
        .filter(|(_, _, since)| *since > version)
        .map(|&(name, nr, _)| (name, nr))
        .collect()
}

/// The BPF program answering `ENOSYS` for every call `version` lacks and allowing the rest.
fn program(version: (u32, u32)) -> Result<BpfProgram> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = missing(version)
        .into_iter()
        .map(|(_, nr)| (nr, Vec::new()))
        .collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| anyhow::anyhow!("kernel profiles: unsupported architecture: {e}"))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| anyhow::anyhow!("building the seccomp filter: {e}"))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| {
        anyhow::anyhow!("compiling the seccomp filter: {e}")
    })
}

/// Installs the profile in this process and `exec`s `command`; returns only on failure.
pub fn run(version: &str, command: &[String]) -> Result<()> {
    let v = parse_version(version)?;
    let Some((prog, args)) = command.split_first() else {
        bail!("kernel-profile {version}: no command given (usage: kernel-profile 5.4 -- CMD...)");
    };
    let bpf = program(v)?;
    // The filter must be in place before any thread of the command exists; this process has
    // only the main thread here, and TSYNC makes sure of it anyway.
    seccompiler::apply_filter_all_threads(&bpf)
        .map_err(|e| anyhow::anyhow!("installing the seccomp filter: {e}"))?;
    let missing: Vec<&str> = missing(v).into_iter().map(|(n, _)| n).collect();
    eprintln!(
        "kernel profile {version}: ENOSYS for {} system calls ({})",
        missing.len(),
        missing.join(" ")
    );
    let err = Command::new(prog)
        .args(args)
        .env("GRAPHDRIVER_KERNEL_PROFILE", version)
        .exec();
    Err(err).with_context(|| format!("kernel profile {version}: exec {prog}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &str) -> Vec<&'static str> {
        missing(parse_version(v).unwrap())
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    #[test]
    fn profiles_hide_exactly_the_newer_calls() {
        let old = names("5.4");
        for call in [
            "close_range",
            "openat2",
            "faccessat2",
            "mount_setattr",
            "setxattrat",
        ] {
            assert!(old.contains(&call), "{call}");
        }
        for call in ["fsopen", "fsmount", "move_mount", "pidfd_open", "clone3"] {
            assert!(!old.contains(&call), "{call} exists on 5.4");
        }
        assert!(!names("5.10").contains(&"close_range"));
        assert!(names("6.8").contains(&"setxattrat"));
        assert!(!names("6.8").contains(&"statmount"));
        assert!(names("6.18").is_empty());
        assert!(parse_version("5").is_err() && parse_version("x.4").is_err());
    }

    #[test]
    fn every_profile_compiles_to_a_filter() {
        for v in ["5.4", "5.10", "5.15", "6.1", "6.8", "6.12"] {
            program(parse_version(v).unwrap()).unwrap();
        }
    }
}
