-- When a sandbox is stopped (or paused) unless its lifetime is extended again (E2B's set_timeout,
-- keep-alive): a deadline the API can move, unlike the spec's fixed timeout. Swept by the server's
-- deadline loop.
CREATE TABLE sandbox_deadlines (
    id TEXT NOT NULL PRIMARY KEY REFERENCES sandboxes (id) ON DELETE CASCADE,
    deadline_ms BIGINT NOT NULL,
    -- What happens at the deadline: 'stop' or 'pause' (freeze, kept until resumed or deleted).
    expiry TEXT NOT NULL DEFAULT 'stop' CHECK (expiry IN ('stop', 'pause'))
);
CREATE INDEX sandbox_deadlines_due ON sandbox_deadlines (deadline_ms);
