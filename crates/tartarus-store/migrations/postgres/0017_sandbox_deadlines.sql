-- When a sandbox is stopped unless its lifetime is extended again (E2B's set_timeout, keep-alive): a
-- deadline the API can move, unlike the spec's fixed timeout. Swept by the server's deadline loop.
CREATE TABLE sandbox_deadlines (
    id TEXT PRIMARY KEY REFERENCES sandboxes (id) ON DELETE CASCADE,
    deadline_ms BIGINT NOT NULL
);
CREATE INDEX sandbox_deadlines_due ON sandbox_deadlines (deadline_ms);
