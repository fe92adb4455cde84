//! Landlock: the second wall. Even if a mount were wrong, the command can only read and execute inside the
//! sandbox root and write only to its scratch areas, its writable mounts and the terminal it was given.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use landlock::{
    Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};

/// The newest ABI we know; older kernels get what they support (at least ABI 1 is required).
const TARGET_ABI: ABI = ABI::V6;

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error(
        "landlock is not available on this kernel (needs Linux >= 5.13 with 'landlock' in the lsm= list)"
    )]
    Unsupported,
    #[error("landlock rule for {path} failed: {message}")]
    Rule { path: String, message: String },
    #[error("landlock setup failed: {0}")]
    Ruleset(String),
}

/// Paths (inside the new root) and what the command may do there.
pub struct LandlockRules<'a> {
    pub writable_dirs: &'a [&'a Path],
    pub device_dir: &'a Path,
    /// Descriptors (stdio) whose files the command may reopen (e.g. `/dev/stdout`).
    pub stdio: &'a [BorrowedFd<'a>],
}

/// Restricts the calling thread (and everything it executes).
pub fn restrict(rules: &LandlockRules<'_>) -> Result<(), LandlockError> {
    let all = AccessFs::from_all(TARGET_ABI);
    let read = AccessFs::from_read(TARGET_ABI);
    let write_all = all & !(AccessFs::MakeBlock | AccessFs::MakeChar);
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::ReadDir | AccessFs::IoctlDev;
    let rule_err = |path: &Path| {
        let path = path.display().to_string();
        move |e: landlock::RulesetError| LandlockError::Rule {
            path,
            message: e.to_string(),
        }
    };
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .and_then(|r| r.scope(Scope::from_all(TARGET_ABI)))
        .and_then(|r| r.create())
        .map_err(|e| LandlockError::Ruleset(e.to_string()))?;
    let root = Path::new("/");
    let root_fd = PathFd::new(root).map_err(|e| LandlockError::Rule {
        path: "/".into(),
        message: e.to_string(),
    })?;
    ruleset = ruleset
        .add_rule(PathBeneath::new(root_fd, read))
        .map_err(rule_err(root))?;
    let dev_fd = PathFd::new(rules.device_dir).map_err(|e| LandlockError::Rule {
        path: rules.device_dir.display().to_string(),
        message: e.to_string(),
    })?;
    ruleset = ruleset
        .add_rule(PathBeneath::new(dev_fd, device))
        .map_err(rule_err(rules.device_dir))?;
    for dir in rules.writable_dirs {
        let fd = PathFd::new(dir).map_err(|e| LandlockError::Rule {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, write_all))
            .map_err(rule_err(dir))?;
    }
    for fd in rules.stdio {
        if let Some(access) = stdio_access(*fd) {
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd.as_fd(), access))
                .map_err(|e| LandlockError::Rule {
                    path: "stdio".into(),
                    message: e.to_string(),
                })?;
        }
    }
    let status = ruleset
        .restrict_self()
        .map_err(|e| LandlockError::Ruleset(e.to_string()))?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(LandlockError::Unsupported);
    }
    Ok(())
}

/// Terminals and regular files given as stdio may be reopened (`echo > /dev/stderr`); others need no rule.
fn stdio_access(fd: BorrowedFd<'_>) -> Option<landlock::BitFlags<AccessFs>> {
    let stat = rustix::fs::fstat(fd).ok()?;
    let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
    match kind {
        rustix::fs::FileType::CharacterDevice => {
            Some(AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev)
        }
        rustix::fs::FileType::RegularFile => Some(AccessFs::ReadFile | AccessFs::WriteFile),
        _ => None,
    }
}
