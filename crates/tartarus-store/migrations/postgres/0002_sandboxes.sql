-- Sandboxes as the server sees them. The spec is the runtime's JSON; shim_pid and dir locate the shim
-- that supervises a running sandbox (used to re-adopt it after a server restart).
CREATE TABLE sandboxes (
    id           TEXT PRIMARY KEY,
    tenant       TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('starting', 'running', 'exited', 'killed', 'failed', 'lost')),
    template     TEXT,
    spec         TEXT NOT NULL,
    labels       TEXT NOT NULL DEFAULT '{}',
    created_ms   BIGINT NOT NULL,
    finished_ms  BIGINT,
    exit_code    BIGINT,
    reason       TEXT,
    shim_pid     BIGINT,
    dir          TEXT NOT NULL
);
CREATE INDEX sandboxes_tenant_status ON sandboxes (tenant, status);
