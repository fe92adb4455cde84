//! The host's `git` for a task: clone, look for changes, commit, push. The repository's database lives
//! outside the work tree the sandbox sees (`--git-dir` and `--work-tree` on every call, hooks off), so
//! nothing the agent writes can make the host's git run a program: it never reads a `.git` the agent
//! could have written.
//!
//! Credentials reach git through its environment only (`GIT_CONFIG_*`: an `http.extraHeader`), never
//! argv or a file, and git's output is scrubbed of them before it is logged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;

/// The longest one git command may run.
const GIT_TIMEOUT: Duration = Duration::from_secs(300);
/// The most output of one git command kept (for the log and errors).
const MAX_OUTPUT: usize = 64 * 1024;

/// HTTP basic credentials of a project (a token is the password).
#[derive(Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// Never shows the password.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot run git")]
    Spawn(#[source] std::io::Error),
    #[error("git {operation} did not finish within {GIT_TIMEOUT:?}")]
    Timeout { operation: &'static str },
    #[error("git {operation} failed: {output}")]
    Failed { operation: &'static str, output: String },
}

/// One task's repository: its git directory and work tree.
pub struct Repository {
    pub git_dir: PathBuf,
    pub work_tree: PathBuf,
    /// `GIT_CONFIG_*` pairs: the credentials' header.
    env: Vec<(String, String)>,
    /// What must never appear in output that is logged.
    secrets: Vec<String>,
    home: PathBuf,
}

impl Repository {
    /// Clones `url` at `branch` under `dir` (`dir/git`, `dir/work`), which must not exist.
    pub async fn clone(
        dir: &Path,
        url: &str,
        branch: &str,
        credentials: Option<&Credentials>,
    ) -> Result<(Repository, String), GitError> {
        let mut env = Vec::new();
        let mut secrets = Vec::new();
        if let Some(c) = credentials {
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
            env.push(("GIT_CONFIG_COUNT".to_string(), "1".to_string()));
            env.push(("GIT_CONFIG_KEY_0".to_string(), "http.extraHeader".to_string()));
            env.push((
                "GIT_CONFIG_VALUE_0".to_string(),
                format!("Authorization: Basic {basic}"),
            ));
            secrets.extend([basic, c.password.clone()]);
        }
        let repository = Repository {
            git_dir: dir.join("git"),
            work_tree: dir.join("work"),
            env,
            secrets,
            home: dir.to_path_buf(),
        };
        let output = repository
            .run(
                "clone",
                &[
                    "clone".as_ref(),
                    "--quiet".as_ref(),
                    "--single-branch".as_ref(),
                    "--branch".as_ref(),
                    branch.as_ref(),
                    "--separate-git-dir".as_ref(),
                    repository.git_dir.as_os_str(),
                    "--".as_ref(),
                    url.as_ref(),
                    repository.work_tree.as_os_str(),
                ],
                false,
            )
            .await?;
        // The work tree's `.git` names the git directory: the sandbox has no use for it.
        let _ = tokio::fs::remove_file(repository.work_tree.join(".git")).await;
        Ok((repository, output))
    }

    /// Whether the work tree differs from the checkout (new, changed or removed files).
    pub async fn has_changes(&self) -> Result<bool, GitError> {
        let status = self
            .git("status", &["status", "--porcelain", "--untracked-files=all"])
            .await?;
        Ok(!status.trim().is_empty())
    }

    /// Commits everything on a new branch `branch` and pushes it to `origin`.
    pub async fn commit_and_push(
        &self,
        branch: &str,
        message: &str,
        author: (&str, &str),
    ) -> Result<String, GitError> {
        let mut log = String::new();
        log += &self.git("switch", &["switch", "--quiet", "-c", branch]).await?;
        log += &self.git("add", &["add", "--all", "--", "."]).await?;
        let name = format!("user.name={}", author.0);
        let email = format!("user.email={}", author.1);
        log += &self
            .git(
                "commit",
                &[
                    "-c",
                    &name,
                    "-c",
                    &email,
                    "commit",
                    "--quiet",
                    "--no-verify",
                    "-m",
                    message,
                ],
            )
            .await?;
        log += &self
            .git(
                "push",
                &[
                    "push",
                    "--quiet",
                    "--porcelain",
                    "origin",
                    &format!("HEAD:refs/heads/{branch}"),
                ],
            )
            .await?;
        Ok(log)
    }

    /// Runs git on this repository (its git directory and work tree given explicitly).
    async fn git(&self, operation: &'static str, args: &[&str]) -> Result<String, GitError> {
        let git_dir = format!("--git-dir={}", self.git_dir.display());
        let work_tree = format!("--work-tree={}", self.work_tree.display());
        let mut all: Vec<&std::ffi::OsStr> = vec![git_dir.as_ref(), work_tree.as_ref()];
        all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        self.run(operation, &all, true).await
    }

    async fn run(
        &self,
        operation: &'static str,
        args: &[&std::ffi::OsStr],
        in_tree: bool,
    ) -> Result<String, GitError> {
        let mut command = tokio::process::Command::new("git");
        command
            // Hooks, fsmonitor and the pager off; no prompts; no system or user configuration.
            .args([
                "-c",
                "core.hooksPath=/dev/null",
                "-c",
                "core.fsmonitor=false",
                "-c",
                "protocol.file.allow=never",
            ])
            .args(args)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", &self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if in_tree {
            command.current_dir(&self.work_tree);
        }
        let output = match tokio::time::timeout(GIT_TIMEOUT, command.output()).await {
            Ok(result) => result.map_err(GitError::Spawn)?,
            Err(_) => return Err(GitError::Timeout { operation }),
        };
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        let text = self.scrub(truncate(text));
        if output.status.success() {
            Ok(text)
        } else {
            Err(GitError::Failed {
                operation,
                output: text.trim().to_string(),
            })
        }
    }

    fn scrub(&self, mut text: String) -> String {
        for secret in self.secrets.iter().filter(|s| !s.is_empty()) {
            text = text.replace(secret.as_str(), "[redacted]");
        }
        text
    }
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_OUTPUT {
        let mut cut = MAX_OUTPUT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[output truncated]\n");
    }
    text
}
