//! Agent tasks (docs/tasks.md): projects (a repository, its default branch and template, credentials
//! sealed by the server — this module stores only the sealed text and never returns it in a
//! [`ProjectRecord`]), tasks with their status, logs (bounded) and result, and each task's events.
//!
//! A task's status moves pending → running → succeeded | failed | cancelled; [`Store::finish_task`] ends
//! only a task that has not ended, so a cancel and a worker that finishes race safely.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::Row;

use crate::columns::{decode, Flag, JsonText, Record, UnknownValue};
use crate::{Store, StoreError};

/// The most characters of logs a task keeps; later output is dropped.
pub const MAX_TASK_LOG_BYTES: i64 = 1 << 20;

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

impl TryFrom<String> for TaskStatus {
    type Error = UnknownValue;
    fn try_from(s: String) -> Result<Self, UnknownValue> {
        Ok(match s.as_str() {
            "pending" => TaskStatus::Pending,
            "running" => TaskStatus::Running,
            "succeeded" => TaskStatus::Succeeded,
            "failed" => TaskStatus::Failed,
            "cancelled" => TaskStatus::Cancelled,
            _ => {
                return Err(UnknownValue {
                    value: s,
                    expected: "pending, running, succeeded, failed or cancelled",
                })
            }
        })
    }
}

/// A project as stored, without its credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ProjectRecord {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub repo_url: String,
    pub default_branch: String,
    pub template: Option<String>,
    /// `OWNER/NAME` on GitHub, where tasks open their pull requests.
    pub github_repo: Option<String>,
    /// Whether credentials are stored (they are never read back through this record).
    #[sqlx(try_from = "Flag")]
    pub has_credentials: bool,
    pub created_ms: i64,
}

impl Record for ProjectRecord {
    const TABLE: &'static str = "projects";
    const KEY: &'static [&'static str] = &["id"];
}

const PROJECT_COLUMNS: &str = "id, tenant, name, repo_url, default_branch, template, github_repo, \
    CAST(CASE WHEN credentials IS NULL THEN 0 ELSE 1 END AS BIGINT) AS has_credentials, created_ms";

/// A new project.
#[derive(Debug, Clone)]
pub struct NewProject<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    pub name: &'a str,
    pub repo_url: &'a str,
    pub default_branch: &'a str,
    pub template: Option<&'a str>,
    pub github_repo: Option<&'a str>,
    /// Sealed by the caller (the server's task key); never stored in the clear.
    pub sealed_credentials: Option<&'a str>,
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct TaskRecord {
    pub id: String,
    pub tenant: String,
    pub project: String,
    pub parent_task_id: Option<String>,
    pub agent_type: String,
    pub prompt: String,
    pub status: TaskStatus,
    #[sqlx(try_from = "Flag")]
    pub cancel_requested: bool,
    pub sandbox: Option<String>,
    pub branch: Option<String>,
    pub pull_request: Option<String>,
    pub output: Option<String>,
    pub error: Option<String>,
    #[sqlx(try_from = "JsonText<BTreeMap<String, String>>")]
    pub metadata: BTreeMap<String, String>,
    pub attempts: i64,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
}

impl Record for TaskRecord {
    const TABLE: &'static str = "tasks";
    const KEY: &'static [&'static str] = &["id"];
}

const TASK_COLUMNS: &str =
    "id, tenant, project, parent_task_id, agent_type, prompt, status, cancel_requested, \
    sandbox, branch, pull_request, output, error, metadata, attempts, created_ms, started_ms, finished_ms";

/// A new task (pending).
#[derive(Debug, Clone)]
pub struct NewTask<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    pub project: &'a str,
    pub parent_task_id: Option<&'a str>,
    pub agent_type: &'a str,
    pub prompt: &'a str,
    pub metadata: &'a BTreeMap<String, String>,
}

/// How a task ended.
#[derive(Debug, Clone)]
pub struct TaskOutcome<'a> {
    pub status: TaskStatus,
    pub output: Option<&'a str>,
    pub error: Option<&'a str>,
    pub branch: Option<&'a str>,
    pub pull_request: Option<&'a str>,
}

/// One event of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct TaskEvent {
    pub seq: i64,
    pub task: String,
    pub at_ms: i64,
    pub kind: String,
    pub message: String,
}

impl Record for TaskEvent {
    const TABLE: &'static str = "task_events";
    const KEY: &'static [&'static str] = &["seq"];
}

impl Store {
    /// Adds a project; `Ok(false)` when the tenant already has one of that name.
    pub async fn insert_project(&self, project: &NewProject<'_>, now_ms: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO projects (id, tenant, name, repo_url, default_branch, template, credentials, created_ms, \
             github_repo) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (tenant, name) DO NOTHING",
        )
        .bind(project.id)
        .bind(project.tenant)
        .bind(project.name)
        .bind(project.repo_url)
        .bind(project.default_branch)
        .bind(project.template)
        .bind(project.sealed_credentials)
        .bind(now_ms)
        .bind(project.github_repo)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A project by id or name, of `tenant` (any tenant's with `None`).
    pub async fn project(
        &self,
        id_or_name: &str,
        tenant: Option<&str>,
    ) -> Result<Option<ProjectRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {PROJECT_COLUMNS} FROM projects WHERE (id = $1 OR name = $1) AND ($2 IS NULL OR tenant = $2) \
             ORDER BY CASE WHEN id = $1 THEN 0 ELSE 1 END LIMIT 1"
        ))
        .bind(id_or_name)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode).transpose()
    }

    pub async fn projects(&self, tenant: Option<&str>) -> Result<Vec<ProjectRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {PROJECT_COLUMNS} FROM projects WHERE ($1 IS NULL OR tenant = $1) ORDER BY created_ms, id"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// The sealed credentials of a project (for the worker to open).
    pub async fn project_credentials(&self, id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT credentials FROM projects WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(row.try_get("credentials")?),
            None => Ok(None),
        }
    }

    /// Removes a project without tasks; `Ok(false)` when there is none of that id for the tenant.
    pub async fn delete_project(&self, id: &str, tenant: Option<&str>) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "DELETE FROM projects WHERE id = $1 AND ($2 IS NULL OR tenant = $2) \
             AND NOT EXISTS (SELECT 1 FROM tasks WHERE project = $1)",
        )
        .bind(id)
        .bind(tenant)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn insert_task(&self, task: &NewTask<'_>, now_ms: i64) -> Result<(), StoreError> {
        let metadata =
            serde_json::to_string(task.metadata).map_err(|e| StoreError::Invalid(e.to_string()))?;
        sqlx::query(
            "INSERT INTO tasks (id, tenant, project, parent_task_id, agent_type, prompt, status, metadata, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8)",
        )
        .bind(task.id)
        .bind(task.tenant)
        .bind(task.project)
        .bind(task.parent_task_id)
        .bind(task.agent_type)
        .bind(task.prompt)
        .bind(metadata)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn task(&self, id: &str, tenant: Option<&str>) -> Result<Option<TaskRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 AND ($2 IS NULL OR tenant = $2)"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode).transpose()
    }

    /// Tasks, newest first, of a tenant (all with `None`), at most `limit`.
    pub async fn tasks(&self, tenant: Option<&str>, limit: i64) -> Result<Vec<TaskRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE ($1 IS NULL OR tenant = $1) ORDER BY created_ms DESC, id DESC LIMIT $2"
        ))
        .bind(tenant)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// A worker starts (or restarts) a task: running, one more attempt. `Ok(false)` when it has ended
    /// (cancelled while it waited).
    pub async fn start_task(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE tasks SET status = 'running', attempts = attempts + 1, started_ms = $2 \
             WHERE id = $1 AND status IN ('pending', 'running') AND cancel_requested = 0",
        )
        .bind(id)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn set_task_sandbox(&self, id: &str, sandbox: Option<&str>) -> Result<(), StoreError> {
        sqlx::query("UPDATE tasks SET sandbox = $2 WHERE id = $1")
            .bind(id)
            .bind(sandbox)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the pull request a running task opened.
    pub async fn set_task_pull_request(&self, id: &str, url: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE tasks SET pull_request = $2 WHERE id = $1")
            .bind(id)
            .bind(url)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Back to pending after a failed attempt that will be retried, with why.
    pub async fn retry_task(&self, id: &str, error: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE tasks SET status = 'pending', error = $2, sandbox = NULL WHERE id = $1 AND status = 'running'")
            .bind(id)
            .bind(error)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ends a task that has not ended; `Ok(false)` when it already had.
    pub async fn finish_task(
        &self,
        id: &str,
        outcome: &TaskOutcome<'_>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        if !outcome.status.is_final() {
            return Err(StoreError::Invalid(format!(
                "{} is not a final status",
                outcome.status.as_str()
            )));
        }
        let done = sqlx::query(
            "UPDATE tasks SET status = $2, output = $3, error = $4, branch = COALESCE($5, branch), \
             pull_request = COALESCE($6, pull_request), finished_ms = $7 \
             WHERE id = $1 AND status IN ('pending', 'running')",
        )
        .bind(id)
        .bind(outcome.status.as_str())
        .bind(outcome.output)
        .bind(outcome.error)
        .bind(outcome.branch)
        .bind(outcome.pull_request)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Asks for a task to be cancelled: a pending one ends now (`Some(Cancelled)`), a running one is
    /// flagged for its worker (`Some(Running)`); `None` for a task that had ended or does not exist.
    pub async fn request_task_cancel(&self, id: &str, now_ms: i64) -> Result<Option<TaskStatus>, StoreError> {
        let pending = sqlx::query(
            "UPDATE tasks SET status = 'cancelled', cancel_requested = 1, finished_ms = $2, error = 'cancelled' \
             WHERE id = $1 AND status = 'pending'",
        )
        .bind(id)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        if pending.rows_affected() == 1 {
            return Ok(Some(TaskStatus::Cancelled));
        }
        let running =
            sqlx::query("UPDATE tasks SET cancel_requested = 1 WHERE id = $1 AND status = 'running'")
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok((running.rows_affected() == 1).then_some(TaskStatus::Running))
    }

    /// Appends to a task's logs while they stay within [`MAX_TASK_LOG_BYTES`]; `Ok(false)` once full.
    pub async fn append_task_log(&self, id: &str, chunk: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE tasks SET logs = logs || $2 WHERE id = $1 AND LENGTH(logs) + LENGTH($2) <= $3",
        )
        .bind(id)
        .bind(chunk)
        .bind(MAX_TASK_LOG_BYTES)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn task_logs(&self, id: &str) -> Result<String, StoreError> {
        let row = sqlx::query("SELECT logs FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(row.try_get("logs")?),
            None => Ok(String::new()),
        }
    }

    pub async fn record_task_event(
        &self,
        task: &str,
        kind: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO task_events (task, at_ms, kind, message) VALUES ($1, $2, $3, $4)")
            .bind(task)
            .bind(now_ms)
            .bind(kind)
            .bind(message)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn task_events(&self, task: &str) -> Result<Vec<TaskEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, task, at_ms, kind, message FROM task_events WHERE task = $1 ORDER BY seq",
        )
        .bind(task)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_moves_through_its_states_once() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            let project = NewProject {
                id: "prj_1",
                tenant: "team-a",
                name: "demo",
                repo_url: "http://127.0.0.1:1/demo.git",
                default_branch: "main",
                template: None,
                github_repo: Some("acme/demo"),
                sealed_credentials: Some("sealed"),
            };
            assert!(store.insert_project(&project, 1).await.unwrap());
            assert!(!store
                .insert_project(
                    &NewProject {
                        id: "prj_2",
                        ..project.clone()
                    },
                    2
                )
                .await
                .unwrap());
            let read = store.project("demo", Some("team-a")).await.unwrap().unwrap();
            assert_eq!(read.id, "prj_1");
            assert!(read.has_credentials);
            assert_eq!(read.github_repo.as_deref(), Some("acme/demo"));
            assert!(
                store.project("demo", Some("team-b")).await.unwrap().is_none(),
                "another tenant's"
            );
            assert_eq!(
                store.project_credentials("prj_1").await.unwrap().as_deref(),
                Some("sealed")
            );

            let metadata = BTreeMap::from([("source".to_string(), "api".to_string())]);
            let task = NewTask {
                id: "task_1",
                tenant: "team-a",
                project: "prj_1",
                parent_task_id: None,
                agent_type: "script",
                prompt: "add a README section",
                metadata: &metadata,
            };
            store.insert_task(&task, 10).await.unwrap();
            assert!(store.start_task("task_1", 11).await.unwrap());
            store.retry_task("task_1", "clone failed").await.unwrap();
            assert!(store.start_task("task_1", 12).await.unwrap());
            let running = store.task("task_1", Some("team-a")).await.unwrap().unwrap();
            assert_eq!((running.status, running.attempts), (TaskStatus::Running, 2));
            assert_eq!(running.metadata, metadata);
            assert!(store.append_task_log("task_1", "line 1\n").await.unwrap());
            assert!(!store
                .append_task_log("task_1", &"x".repeat(MAX_TASK_LOG_BYTES as usize))
                .await
                .unwrap());
            assert_eq!(store.task_logs("task_1").await.unwrap(), "line 1\n");
            assert_eq!(
                store.request_task_cancel("task_1", 13).await.unwrap(),
                Some(TaskStatus::Running)
            );
            let outcome = TaskOutcome {
                status: TaskStatus::Cancelled,
                output: None,
                error: Some("cancelled"),
                branch: None,
                pull_request: None,
            };
            assert!(store.finish_task("task_1", &outcome, 14).await.unwrap());
            let succeeded = TaskOutcome {
                status: TaskStatus::Succeeded,
                ..outcome
            };
            assert!(
                !store.finish_task("task_1", &succeeded, 15).await.unwrap(),
                "ended twice"
            );
            assert!(
                !store.start_task("task_1", 16).await.unwrap(),
                "restarted after it ended"
            );
            assert!(
                !store.delete_project("prj_1", Some("team-a")).await.unwrap(),
                "deleted with tasks"
            );
            store
                .record_task_event("task_1", "task.created", "queued", 10)
                .await
                .unwrap();
            assert_eq!(store.task_events("task_1").await.unwrap().len(), 1);
        }
    }
}
