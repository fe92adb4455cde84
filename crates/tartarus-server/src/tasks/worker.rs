//! The task workers: each leases the next task item from the queue (topic `task`), runs it, and acks it,
//! retries it with the queue's backoff, or lets it become a dead letter.
//!
//! One run: clone on the host → a sandbox (the project's template, then the tenant's policy, as any
//! create) whose only view of the repository is the work tree, mounted read-write at `/workspace` (no
//! network unless the policy or template gives it, the sandbox user owning the files) → the agent type's command
//! with the prompt on stdin, its output appended to the task's logs as it is written → the sandbox
//! killed → no change: succeeded with "no changes"; else commit on `tartarus/TASK`, push. A cancel
//! request kills the sandbox; the agent's timeout ends the run as failed.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tartarus_store::{QueueItem, TaskOutcome, TaskRecord, TaskStatus, Topic};

use super::git::{Credentials, Repository};
use crate::AppState;

/// How long a leased task item is held before another worker may take it: the agent's timeout and this.
const LEASE_MARGIN: Duration = Duration::from_secs(600);
/// How often an idle worker looks at the queue, and a running task at its cancel flag.
const POLL: Duration = Duration::from_millis(250);
/// Where the sandbox sees the work tree.
const WORKSPACE: &str = "/workspace";
/// The sandbox user's uid on the host when the server runs as root (the process lane's id map).
const SANDBOX_HOST_UID: u32 = 100_001_000;

/// What a queue item carries.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct TaskItem {
    pub task: String,
}

/// How one run went.
enum Run {
    Done(TaskStatus, String, Option<String>),
    /// Failed in a way that may pass: retried while attempts remain.
    Retry(String),
}

/// Starts `settings.workers` worker loops.
pub fn spawn_workers(state: AppState, settings: Arc<super::TaskSettings>) {
    for n in 0..settings.workers {
        let state = state.clone();
        let settings = settings.clone();
        tokio::spawn(async move {
            let worker = format!("{}:task-worker-{n}", state.cluster.replica);
            loop {
                let lease = settings.agent_timeout + LEASE_MARGIN;
                let item = state
                    .store
                    .dequeue_on(
                        Topic::Task,
                        &worker,
                        tartarus_store::now_ms(),
                        lease.as_millis() as i64,
                    )
                    .await;
                match item {
                    Ok(Some(item)) => handle(&state, &settings, &worker, item).await,
                    Ok(None) => tokio::time::sleep(POLL).await,
                    Err(e) => {
                        tracing::error!("task queue: {}", tartarus_runtime::error_chain(&e));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }
}

async fn handle(state: &AppState, settings: &super::TaskSettings, worker: &str, item: QueueItem) {
    let now = tartarus_store::now_ms;
    let task_id = match serde_json::from_str::<TaskItem>(&item.payload) {
        Ok(payload) => payload.task,
        Err(e) => {
            let _ = state
                .store
                .reject(
                    &item.id,
                    worker,
                    &format!("unreadable task item: {e}"),
                    false,
                    now(),
                )
                .await;
            return;
        }
    };
    let task = match state.store.task(&task_id, None).await {
        Ok(Some(task)) => task,
        Ok(None) => {
            let _ = state
                .store
                .reject(&item.id, worker, "no such task", false, now())
                .await;
            return;
        }
        Err(e) => {
            let _ = state
                .store
                .reject(&item.id, worker, &e.to_string(), true, now())
                .await;
            return;
        }
    };
    match state.store.start_task(&task.id, now()).await {
        Ok(true) => {}
        // Cancelled (or ended) while it waited.
        Ok(false) => {
            let _ = state.store.ack(&item.id, worker, now()).await;
            return;
        }
        Err(e) => {
            let _ = state
                .store
                .reject(&item.id, worker, &e.to_string(), true, now())
                .await;
            return;
        }
    }
    super::task_event(
        state,
        &task,
        "task.started",
        &format!("attempt {} on {worker}", item.attempts),
        json!({}),
    )
    .await;
    let outcome = run(state, settings, &task).await;
    let _ = state.store.set_task_sandbox(&task.id, None).await;
    match outcome {
        Run::Retry(reason) if item.attempts < item.max_attempts => {
            append_log(
                state,
                &task.id,
                &format!(
                    "[tartarus] attempt {} failed: {reason}; retrying\n",
                    item.attempts
                ),
            )
            .await;
            let _ = state.store.retry_task(&task.id, &reason).await;
            let _ = state.store.reject(&item.id, worker, &reason, true, now()).await;
            super::task_event(
                state,
                &task,
                "task.retrying",
                &reason,
                json!({ "attempt": item.attempts }),
            )
            .await;
        }
        Run::Retry(reason) => {
            finish(
                state,
                &task,
                TaskStatus::Failed,
                &format!("{reason} (after {} attempts)", item.attempts),
                None,
            )
            .await;
            let _ = state.store.reject(&item.id, worker, &reason, false, now()).await;
        }
        Run::Done(status, message, branch) => {
            finish(state, &task, status, &message, branch.as_deref()).await;
            let _ = state.store.ack(&item.id, worker, now()).await;
        }
    }
}

async fn finish(
    state: &AppState,
    task: &TaskRecord,
    status: TaskStatus,
    message: &str,
    branch: Option<&str>,
) {
    let failed = status != TaskStatus::Succeeded;
    let outcome = TaskOutcome {
        status,
        output: (!failed).then_some(message),
        error: failed.then_some(message),
        branch,
        pull_request: None,
    };
    match state
        .store
        .finish_task(&task.id, &outcome, tartarus_store::now_ms())
        .await
    {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!(task = %task.id, "recording the outcome failed: {}", tartarus_runtime::error_chain(&e))
        }
    }
    let kind = match status {
        TaskStatus::Succeeded => "task.completed",
        TaskStatus::Cancelled => "task.cancelled",
        _ => "task.failed",
    };
    super::task_event(
        state,
        task,
        kind,
        message,
        json!({ "status": status.as_str(), "branch": branch }),
    )
    .await;
}

async fn append_log(state: &AppState, task: &str, text: &str) {
    if let Err(e) = state.store.append_task_log(task, text).await {
        tracing::warn!(
            task,
            "appending to the task's logs failed: {}",
            tartarus_runtime::error_chain(&e)
        );
    }
}

async fn run(state: &AppState, settings: &super::TaskSettings, task: &TaskRecord) -> Run {
    let Some(command) = settings.agent_types.get(&task.agent_type) else {
        return Run::Done(
            TaskStatus::Failed,
            format!(
                "agent type '{}' is not configured on this server",
                task.agent_type
            ),
            None,
        );
    };
    let project = match state.store.project(&task.project, Some(&task.tenant)).await {
        Ok(Some(project)) => project,
        Ok(None) => {
            return Run::Done(
                TaskStatus::Failed,
                format!("project {} is gone", task.project),
                None,
            )
        }
        Err(e) => return Run::Retry(e.to_string()),
    };
    let credentials = match credentials(state, &project.id).await {
        Ok(c) => c,
        Err(message) => return Run::Done(TaskStatus::Failed, message, None),
    };
    let dir = state.tasks_dir.join(&task.id);
    let _ = tokio::fs::remove_dir_all(&dir).await;
    if let Err(e) = tokio::fs::create_dir_all(&dir).await {
        return Run::Retry(format!("creating {}: {e}", dir.display()));
    }
    let result = run_in(
        state,
        settings,
        task,
        &project,
        credentials.as_ref(),
        command,
        &dir,
    )
    .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

async fn credentials(state: &AppState, project: &str) -> Result<Option<Credentials>, String> {
    let sealed = state
        .store
        .project_credentials(project)
        .await
        .map_err(|e| e.to_string())?;
    let Some(sealed) = sealed else { return Ok(None) };
    let plain = state.task_key.open(project, &sealed).map_err(|e| e.to_string())?;
    serde_json::from_slice(&plain)
        .map(Some)
        .map_err(|_| "stored credentials are unreadable".to_string())
}

async fn run_in(
    state: &AppState,
    settings: &super::TaskSettings,
    task: &TaskRecord,
    project: &tartarus_store::ProjectRecord,
    credentials: Option<&Credentials>,
    command: &str,
    dir: &std::path::Path,
) -> Run {
    append_log(
        state,
        &task.id,
        &format!(
            "[tartarus] cloning {} at {}\n",
            project.repo_url, project.default_branch
        ),
    )
    .await;
    let repository =
        match Repository::clone(dir, &project.repo_url, &project.default_branch, credentials).await {
            Ok((repository, output)) => {
                append_log(state, &task.id, &output).await;
                repository
            }
            Err(e) => return Run::Retry(tartarus_runtime::error_chain(&e)),
        };
    if rustix::process::geteuid().is_root() {
        if let Err(e) = chown_tree(&repository.work_tree, SANDBOX_HOST_UID).await {
            return Run::Retry(format!("giving the work tree to the sandbox user: {e}"));
        }
    }
    let agent = run_agent(
        state,
        settings,
        task,
        command,
        &repository.work_tree,
        project.template.as_ref(),
    )
    .await;
    let message = match agent {
        Ok(AgentEnd::Exited(0)) => None,
        Ok(AgentEnd::Exited(code)) => Some(format!("the agent exited with status {code}")),
        Ok(AgentEnd::TimedOut) => Some(format!(
            "the agent did not finish within {:?}",
            settings.agent_timeout
        )),
        Ok(AgentEnd::Cancelled) => return Run::Done(TaskStatus::Cancelled, "cancelled".to_string(), None),
        // The tenant's policy decides the same way on the next attempt.
        Ok(AgentEnd::Refused(reason)) => return Run::Done(TaskStatus::Failed, reason, None),
        Err(e) => return Run::Retry(e),
    };
    if let Some(message) = message {
        return Run::Done(TaskStatus::Failed, message, None);
    }
    // The host reads what the sandbox user wrote: give the tree back before git looks at it.
    if rustix::process::geteuid().is_root() {
        if let Err(e) = chown_tree(&repository.work_tree, 0).await {
            return Run::Retry(format!("taking the work tree back: {e}"));
        }
    }
    match repository.has_changes().await {
        Ok(false) => return Run::Done(TaskStatus::Succeeded, "no changes".to_string(), None),
        Ok(true) => {}
        Err(e) => return Run::Done(TaskStatus::Failed, tartarus_runtime::error_chain(&e), None),
    }
    let branch = format!("tartarus/{}", task.id);
    let subject: String = task
        .prompt
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(72)
        .collect();
    let message = format!(
        "{subject}\n\nTask {} ({} agent) on project {}.\n",
        task.id, task.agent_type, project.name
    );
    match repository
        .commit_and_push(&branch, &message, (&settings.author_name, &settings.author_email))
        .await
    {
        Ok(output) => {
            append_log(state, &task.id, &output).await;
            append_log(state, &task.id, &format!("[tartarus] pushed {branch}\n")).await;
            match (&settings.github, &project.github_repo) {
                (Some(github), Some(repo)) => {
                    let body = pull_request_body(settings, task);
                    let opened = super::github::open_pull_request(
                        github,
                        repo,
                        &branch,
                        &project.default_branch,
                        &subject,
                        &body,
                    )
                    .await;
                    match opened {
                        Ok(pull) => {
                            let _ = state.store.set_task_pull_request(&task.id, &pull.html_url).await;
                            let line = format!(
                                "[tartarus] opened pull request #{} {}\n",
                                pull.number, pull.html_url
                            );
                            append_log(state, &task.id, &line).await;
                            let output = format!("opened pull request {}", pull.html_url);
                            Run::Done(TaskStatus::Succeeded, output, Some(branch))
                        }
                        Err(e) => Run::Done(
                            TaskStatus::Failed,
                            format!(
                                "pushed branch {branch}, but the pull request was not opened: {}",
                                tartarus_runtime::error_chain(&e)
                            ),
                            Some(branch),
                        ),
                    }
                }
                _ => Run::Done(
                    TaskStatus::Succeeded,
                    format!("pushed branch {branch}"),
                    Some(branch),
                ),
            }
        }
        // A push the remote rejected is not retried: the same commit would be rejected again.
        Err(e) => Run::Done(TaskStatus::Failed, tartarus_runtime::error_chain(&e), None),
    }
}

enum AgentEnd {
    Exited(i32),
    TimedOut,
    Cancelled,
    /// Admission refused the sandbox (not retried).
    Refused(String),
}

/// Runs the agent in a new sandbox and kills the sandbox afterwards, whatever happened.
async fn run_agent(
    state: &AppState,
    settings: &super::TaskSettings,
    task: &TaskRecord,
    command: &str,
    work_tree: &std::path::Path,
    template: Option<&String>,
) -> Result<AgentEnd, String> {
    let mut spec = tartarus_runtime::SandboxSpec {
        service: true,
        ..tartarus_runtime::SandboxSpec::default()
    };
    crate::sandboxes::with_default_pids(&mut spec);
    spec.timeout = Some(settings.agent_timeout + Duration::from_secs(60));
    // The project's template (its image and defaults), then the tenant's policy, as for any create.
    let caller = crate::auth::Caller {
        key_id: format!("task:{}", task.id),
        tenant: task.tenant.clone(),
        role: tartarus_store::Role::User,
    };
    if let Some(id) = template {
        let record = state
            .store
            .get_template(id, Some(&task.tenant))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("the project's template '{id}' does not exist"))?;
        let definition: tartarus_image::template::Template =
            serde_json::from_str(&record.definition).map_err(|e| format!("stored template '{id}': {e}"))?;
        let puller = crate::images::PullFor::owner(record.tenant.as_deref());
        let image = state
            .images
            .ensure(&definition.base_image, puller)
            .await
            .map_err(|e| e.message)?;
        crate::images::apply_template(
            &mut spec,
            &definition,
            &state.images,
            &image,
            state.manager.shim_exe(),
        )
        .map_err(|e| e.message)?;
    }
    let facts = crate::policies::AdmissionFacts {
        template: template.map(String::as_str),
        class: None,
        rootfs: false,
    };
    match crate::policies::admit(state, &caller, &mut spec, &facts).await {
        Ok(_) => {}
        Err(e) if e.status.is_client_error() => {
            return Ok(AgentEnd::Refused(format!(
                "admission refused the task's sandbox: {}",
                e.message
            )));
        }
        Err(e) => return Err(format!("admission failed: {}", e.message)),
    }
    // The server's own mount, after admission: the policy judges what the tenant's project asks for
    // (its template), and a policy that forbids writable mounts forbids the tenant's, not the work tree
    // the task exists for.
    spec.mounts.push(tartarus_runtime::BindMount {
        source: work_tree.to_path_buf(),
        target: WORKSPACE.into(),
        writable: true,
    });
    spec.validate().map_err(|e| e.to_string())?;
    let labels = std::collections::BTreeMap::from([("tartarus.task".to_string(), task.id.clone())]);
    let runtime = tartarus_policy::RuntimeDecision {
        runtime: tartarus_runtime::lanes::LaneName::Process,
        reason: "agent tasks run on the process lane".to_string(),
    };
    let record = state
        .manager
        .create(&task.tenant, spec, labels, None, None, &runtime)
        .await
        .map_err(|e| format!("the task's sandbox did not start: {}", e.message))?;
    let _ = state.store.set_task_sandbox(&task.id, Some(&record.id)).await;
    append_log(
        state,
        &task.id,
        &format!(
            "[tartarus] sandbox {} started; running the {} agent\n",
            record.id, task.agent_type
        ),
    )
    .await;
    let end = drive_agent(state, settings, task, command, &record).await;
    if let Err(e) = state.manager.kill(&record).await {
        tracing::warn!(task = %task.id, sandbox = %record.id, "killing the task's sandbox: {}", e.message);
    }
    end
}

async fn drive_agent(
    state: &AppState,
    settings: &super::TaskSettings,
    task: &TaskRecord,
    command: &str,
    record: &tartarus_store::SandboxRecord,
) -> Result<AgentEnd, String> {
    use tartarus_shim::protocol::StreamEvent;
    let prompt_file = "/tmp/tartarus-prompt";
    let request = tartarus_shim::protocol::ExecRequest {
        command: vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            format!("cat > {prompt_file} && exec /bin/sh -c \"$TARTARUS_AGENT\" < {prompt_file}"),
        ],
        env: vec![
            ("TARTARUS_AGENT".to_string(), command.to_string()),
            ("TARTARUS_PROMPT_FILE".to_string(), prompt_file.to_string()),
            ("TARTARUS_TASK_ID".to_string(), task.id.clone()),
        ],
        workdir: Some(WORKSPACE.to_string()),
        stdin: task.prompt.as_bytes().to_vec(),
        timeout_ms: Some(settings.agent_timeout.as_millis() as u64),
        stream: true,
    };
    let mut events = state
        .manager
        .exec_stream(record, request)
        .await
        .map_err(|e| format!("starting the agent: {}", e.message))?;
    let mut cancel_check = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(StreamEvent::Output { data, .. })) => append_log(state, &task.id, &data).await,
                Some(Ok(StreamEvent::Started)) => {}
                Some(Ok(StreamEvent::Exit(exit))) => {
                    return Ok(if exit.timed_out { AgentEnd::TimedOut } else { AgentEnd::Exited(exit.exit_code) });
                }
                Some(Err(e)) => return Err(format!("the agent's stream: {e}")),
                None => return Err("the agent's sandbox went away".to_string()),
            },
            _ = cancel_check.tick() => {
                if matches!(state.store.task(&task.id, None).await, Ok(Some(t)) if t.cancel_requested) {
                    append_log(state, &task.id, "[tartarus] cancelled: killing the sandbox\n").await;
                    return Ok(AgentEnd::Cancelled);
                }
            }
        }
    }
}

/// What a task's pull request says: the prompt, and links to the task and its logs.
fn pull_request_body(settings: &super::TaskSettings, task: &TaskRecord) -> String {
    let base = settings.public_url.as_deref().unwrap_or("").trim_end_matches('/');
    format!(
        "{}\n\n---\nTask [{id}]({base}/v1/tasks/{id}) ({agent} agent) · [logs]({base}/v1/tasks/{id}/logs)\n",
        task.prompt,
        id = task.id,
        agent = task.agent_type,
    )
}

/// `chown -R` without following symlinks (the agent may have made some).
async fn chown_tree(root: &std::path::Path, uid: u32) -> std::io::Result<()> {
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut stack = vec![root];
        while let Some(path) = stack.pop() {
            let meta = std::fs::symlink_metadata(&path)?;
            std::os::unix::fs::lchown(&path, Some(uid), Some(uid))?;
            if meta.is_dir() {
                for entry in std::fs::read_dir(&path)? {
                    stack.push(entry?.path());
                }
            }
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}
