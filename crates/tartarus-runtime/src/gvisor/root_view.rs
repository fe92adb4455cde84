//! What the sandbox's root will show, judged on the host before runsc runs: whether the working directory
//! exists (runsc would create a missing one; the process lane refuses it) and whether the main command
//! can be found (runsc prints a start failure into the command's own stderr, so a command known to be
//! missing is refused before runsc is asked).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use super::canonical_dir;
use crate::sandbox::PrepareError;
use crate::spec::{normalize_sandbox_path, RootSpec, SandboxSpec, DEFAULT_PATH, SANDBOX_HOME};

/// What the host can tell of the main command before the sandbox starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CommandCheck {
    /// A regular file with an execute bit where the command resolves.
    Found,
    /// Nowhere on the sandbox's `PATH` (or not at the path given).
    NotFound,
    /// There, but not an executable regular file.
    NotExecutable,
    /// Where the host cannot see it (a scratch area, the generated `/etc`): runsc will say.
    Unknown,
}

/// Resolves the main command as the sandbox will: a name with a slash from the working directory, a bare
/// name through the sandbox's `PATH`. `mounts` are (host source, sandbox target); `root` is the host
/// directory of a directory or image root (mounted), ignored for the host system.
pub(super) fn check_command(
    spec: &SandboxSpec,
    mounts: &[(PathBuf, PathBuf, bool)],
    root: &Path,
) -> CommandCheck {
    let Some(program) = spec.command.first() else {
        return CommandCheck::Unknown;
    };
    let workdir = spec
        .workdir
        .as_deref()
        .map(normalize_sandbox_path)
        .unwrap_or_else(|| SANDBOX_HOME.into());
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![normalize_sandbox_path(&workdir.join(program))]
    } else {
        let path = spec
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or(DEFAULT_PATH);
        path.split(':')
            .filter(|dir| dir.starts_with('/'))
            .map(|dir| normalize_sandbox_path(&Path::new(dir).join(program)))
            .collect()
    };
    let mut verdict = CommandCheck::NotFound;
    for candidate in candidates {
        match look_up(spec, mounts, root, &candidate) {
            CommandCheck::Found => return CommandCheck::Found,
            CommandCheck::NotFound => {}
            other => verdict = other,
        }
    }
    verdict
}

/// Where the sandbox path `path` lives on the host: inside the innermost bind mount holding it, in the
/// host's own tree for the host system's real top-level entries, or in the mounted root; `None` where the
/// host cannot see it before the sandbox starts (scratch areas, the generated `/etc`).
fn host_path(
    spec: &SandboxSpec,
    mounts: &[(PathBuf, PathBuf, bool)],
    root: &Path,
    path: &Path,
) -> Option<PathBuf> {
    if let Some((source, target, _)) = mounts
        .iter()
        .filter(|(_, target, _)| path.starts_with(target))
        .max_by_key(|(_, target, _)| target.components().count())
    {
        return Some(source.join(path.strip_prefix(target).unwrap_or(Path::new(""))));
    }
    if ["/tmp", SANDBOX_HOME, "/dev", "/proc", "/sys", "/.tartarus"]
        .iter()
        .any(|scratch| path.starts_with(scratch))
    {
        return None;
    }
    let relative = path.strip_prefix("/").unwrap_or(path);
    match spec.root {
        RootSpec::HostSystem => {
            let first = relative
                .components()
                .next()?
                .as_os_str()
                .to_string_lossy()
                .into_owned();
            crate::process::rootfs::HOST_ENTRY_NAMES
                .contains(&first.as_str())
                .then(|| Path::new("/").join(relative))
        }
        _ => Some(root.join(relative)),
    }
}

/// Follows `path` component by component as the sandbox's kernel will, symlinks included (relative ones
/// from their directory, absolute ones from the sandbox's `/`), across bind mounts.
fn look_up(
    spec: &SandboxSpec,
    mounts: &[(PathBuf, PathBuf, bool)],
    root: &Path,
    path: &Path,
) -> CommandCheck {
    /// As Linux: at most 40 symlinks on one lookup.
    const MAX_LINKS: usize = 40;
    let mut pending: std::collections::VecDeque<std::ffi::OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut current = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            current.pop();
            continue;
        }
        let next = current.join(&name);
        let Some(host) = host_path(spec, mounts, root, &next) else {
            return CommandCheck::Unknown;
        };
        match std::fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                let Ok(target) = std::fs::read_link(&host) else {
                    return CommandCheck::Unknown;
                };
                if links > MAX_LINKS {
                    return CommandCheck::Unknown;
                }
                if target.is_absolute() {
                    current = PathBuf::from("/");
                }
                for component in target.components().rev() {
                    match component {
                        Component::Normal(part) => pending.push_front(part.to_os_string()),
                        Component::ParentDir => pending.push_front("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(meta) if pending.is_empty() => return classify(Ok((meta.is_file(), meta.mode()))),
            Ok(meta) if meta.is_dir() => current = next,
            Ok(_) => return CommandCheck::NotFound,
            Err(e) => return classify(Err(e)),
        }
    }
    CommandCheck::NotExecutable
}

fn classify(meta: io::Result<(bool, u32)>) -> CommandCheck {
    match meta {
        Ok((true, mode)) if mode & 0o111 != 0 => CommandCheck::Found,
        Ok(_) => CommandCheck::NotExecutable,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => CommandCheck::NotFound,
        Err(_) => CommandCheck::Unknown,
    }
}

/// The spec's working directory if the sandbox's root will not have it when the command starts, judged from
/// what the root is made of: scratch mounts start empty, bind mounts show their source, the host system
/// root shows the host's `/usr` and its links, a directory root itself. An image root gets it created, as
/// in the process lane.
pub(super) fn missing_workdir(
    spec: &SandboxSpec,
    mounts: &[(PathBuf, PathBuf, bool)],
) -> Result<Option<PathBuf>, PrepareError> {
    let Some(workdir) = spec.workdir.as_deref().map(normalize_sandbox_path) else {
        return Ok(None);
    };
    let mut points: Vec<(PathBuf, Option<PathBuf>)> =
        ["/tmp", SANDBOX_HOME, "/dev/shm", "/dev", "/proc", "/sys"]
            .iter()
            .map(|p| (PathBuf::from(p), None))
            .collect();
    points.extend(
        mounts
            .iter()
            .map(|(source, target, _)| (target.clone(), Some(source.clone()))),
    );
    let exists = if matches!(spec.root, RootSpec::Layers(_))
        || points.iter().any(|(p, _)| p.starts_with(&workdir))
    {
        // Created for an image root; a mount point or one of its parents.
        true
    } else if let Some((point, source)) = points
        .iter()
        .filter(|(p, _)| workdir.starts_with(p))
        .max_by_key(|(p, _)| p.components().count())
    {
        let rest = workdir.strip_prefix(point).unwrap_or(Path::new(""));
        match source {
            Some(source) => source.join(rest).is_dir(),
            None if point == Path::new("/proc") || point == Path::new("/sys") => point.join(rest).is_dir(),
            None => false,
        }
    } else {
        let relative = workdir.strip_prefix("/").unwrap_or(&workdir);
        match &spec.root {
            RootSpec::HostSystem => {
                let first = relative
                    .components()
                    .next()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned());
                match first.as_deref() {
                    Some(name) if crate::process::rootfs::HOST_ENTRY_NAMES.contains(&name) => {
                        Path::new("/").join(relative).is_dir()
                    }
                    Some(_) => relative == Path::new("etc"),
                    None => true,
                }
            }
            RootSpec::Directory(path) => canonical_dir(path)?.join(relative).is_dir(),
            RootSpec::Layers(_) => true,
        }
    };
    Ok((!exists).then_some(workdir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &str) -> SandboxSpec {
        SandboxSpec::new(vec![command.into()])
    }

    #[test]
    fn test_the_host_systems_commands_are_found_through_path_and_missing_ones_are_not() {
        let none = Path::new("/nonexistent");
        assert_eq!(check_command(&spec("sh"), &[], none), CommandCheck::Found);
        assert_eq!(check_command(&spec("/bin/sh"), &[], none), CommandCheck::Found);
        assert_eq!(
            check_command(&spec("no-such-command-here"), &[], none),
            CommandCheck::NotFound
        );
        assert_eq!(
            check_command(&spec("/usr/no/such"), &[], none),
            CommandCheck::NotFound
        );
        assert_eq!(
            check_command(&spec("/etc/passwd"), &[], none),
            CommandCheck::Unknown,
            "generated /etc"
        );
        assert_eq!(
            check_command(&spec("/tmp/x"), &[], none),
            CommandCheck::Unknown,
            "scratch"
        );
        assert_eq!(
            check_command(&spec("/usr/share"), &[], none),
            CommandCheck::NotExecutable
        );
    }

    #[test]
    fn test_a_directory_root_resolves_its_own_symlinks_inside_it_and_mounts_show_their_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("usr/bin")).expect("dirs");
        std::fs::write(root.join("usr/bin/tool"), b"#!/bin/sh\n").expect("tool");
        std::fs::set_permissions(
            root.join("usr/bin/tool"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        // An absolute link: inside the root it means the root's /usr/bin, not the host's.
        std::os::unix::fs::symlink("/usr/bin", root.join("bin")).expect("link");
        let mut s = spec("/bin/tool");
        s.root = RootSpec::Directory(root.clone());
        assert_eq!(check_command(&s, &[], &root), CommandCheck::Found);
        s.command = vec!["tool".into()];
        assert_eq!(check_command(&s, &[], &root), CommandCheck::Found);
        s.command = vec!["/bin/sh".into()];
        assert_eq!(
            check_command(&s, &[], &root),
            CommandCheck::NotFound,
            "not the host's /bin/sh"
        );
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data");
        std::fs::write(data.join("script"), b"x").expect("script");
        s.command = vec!["/data/script".into()];
        let mounts = [(data.clone(), PathBuf::from("/data"), false)];
        assert_eq!(check_command(&s, &mounts, &root), CommandCheck::NotExecutable);
    }
}
