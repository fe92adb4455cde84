-- Agent tasks (issue 21, docs/tasks.md): projects (a repository, its branch and template, credentials
-- sealed with the server's task key), tasks (a prompt for an agent type on a project), and each task's
-- events. The queue gets a topic so that task items and sandbox requests never meet.
CREATE TABLE projects (
    id             TEXT NOT NULL PRIMARY KEY,
    tenant         TEXT NOT NULL,
    name           TEXT NOT NULL,
    repo_url       TEXT NOT NULL,
    default_branch TEXT NOT NULL,
    template       TEXT,
    -- OWNER/NAME on GitHub (or GitHub Enterprise): where the task's pull requests are opened.
    github_repo    TEXT,
    -- ChaCha20-Poly1305 under the server's task key: nonce || ciphertext, base64. Never returned.
    credentials    TEXT,
    created_ms     INTEGER NOT NULL,
    UNIQUE (tenant, name)
);
CREATE TABLE tasks (
    id             TEXT NOT NULL PRIMARY KEY,
    tenant         TEXT NOT NULL,
    project        TEXT NOT NULL REFERENCES projects (id),
    parent_task_id TEXT REFERENCES tasks (id),
    agent_type     TEXT NOT NULL,
    prompt         TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    sandbox        TEXT,
    branch         TEXT,
    pull_request   TEXT,
    output         TEXT,
    error          TEXT,
    logs           TEXT NOT NULL DEFAULT '',
    metadata       TEXT NOT NULL DEFAULT '{}',
    attempts       INTEGER NOT NULL DEFAULT 0,
    created_ms     INTEGER NOT NULL,
    started_ms     INTEGER,
    finished_ms    INTEGER
);
CREATE INDEX tasks_by_tenant ON tasks (tenant, created_ms);
CREATE TABLE task_events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    task    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    at_ms   INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX task_events_by_task ON task_events (task, seq);
ALTER TABLE queue ADD COLUMN topic TEXT NOT NULL DEFAULT 'sandbox' CHECK (topic IN ('sandbox', 'task'));
