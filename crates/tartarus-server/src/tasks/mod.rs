//! Agent tasks (docs/tasks.md): a prompt and a project's repository in, a pushed branch out.
//!
//! Place in the data flow: `routes/tasks.rs` stores projects (credentials sealed with [`TaskKey`]) and
//! tasks, and enqueues each task on the durable queue (topic `task`); [`worker`] loops on every replica
//! lease task items, clone the repository on the host ([`git`]), run the project's agent in a sandbox that
//! sees only the work tree, commit what changed on a new branch and push it. Every step is a task event
//! and a `task.*` event on the bus.
//!
//! Credentials never enter the sandbox: the agent is untrusted code, and everything it needs is the work
//! tree. The host's git gets them from its environment, for the clone and the push only.

pub mod git;
pub mod github;
pub mod key;
pub mod worker;

use std::collections::BTreeMap;
use std::time::Duration;

pub use key::TaskKey;

/// `tartarus server`'s task settings.
#[derive(Debug, Clone)]
pub struct TaskSettings {
    /// Agent types by name: a shell command run in the sandbox (`/bin/sh -c`), the prompt on its stdin and
    /// in `$TARTARUS_PROMPT_FILE`, the repository's work tree as its working directory.
    pub agent_types: BTreeMap<String, String>,
    /// The commits' author and committer.
    pub author_name: String,
    pub author_email: String,
    /// The most one agent run may take.
    pub agent_timeout: Duration,
    /// Worker loops on this replica (0: this replica runs no tasks).
    pub workers: usize,
    /// Attempts per task, for failures that may pass (the clone, the sandbox, the push's connection).
    pub max_attempts: i64,
    /// Where projects with a `github_repo` get their pull requests.
    pub github: Option<github::GithubSettings>,
    /// This server's URL as links in pull requests should name it (`--public-url`).
    pub public_url: Option<String>,
}

impl Default for TaskSettings {
    fn default() -> TaskSettings {
        TaskSettings {
            agent_types: BTreeMap::new(),
            author_name: "Tartarus".to_string(),
            author_email: "tartarus@localhost".to_string(),
            agent_timeout: Duration::from_secs(30 * 60),
            workers: 1,
            max_attempts: 3,
            github: None,
            public_url: None,
        }
    }
}

/// Publishes a task's event on the bus and records it with the task.
pub(crate) async fn task_event(
    state: &crate::AppState,
    task: &tartarus_store::TaskRecord,
    kind: &str,
    message: &str,
    extra: serde_json::Value,
) {
    if let Err(e) = state
        .store
        .record_task_event(&task.id, kind, message, tartarus_store::now_ms())
        .await
    {
        tracing::error!(task = %task.id, "recording a task event failed: {}", tartarus_runtime::error_chain(&e));
    }
    let mut data = serde_json::json!({
        "task": task.id,
        "project": task.project,
        "agent_type": task.agent_type,
        "message": message,
    });
    if let (Some(data), serde_json::Value::Object(mut extra)) = (data.as_object_mut(), extra) {
        data.append(&mut extra);
    }
    state.events.publish(kind, Some(&task.tenant), data);
}
