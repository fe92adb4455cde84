-- The durable queue of sandbox requests waiting for a place: three lanes, priority within a lane,
-- leases for delivery, bounded retries, dead letters.
CREATE TABLE queue (
    id               TEXT PRIMARY KEY,
    lane             TEXT NOT NULL CHECK (lane IN ('swift', 'main', 'deep')),
    lane_rank        INTEGER NOT NULL,   -- 0 swift, 1 main, 2 deep: dequeue order across lanes
    priority         INTEGER NOT NULL,   -- higher first within a lane
    tenant           TEXT NOT NULL,
    payload          TEXT NOT NULL,      -- the request (JSON)
    state            TEXT NOT NULL CHECK (state IN ('ready', 'leased', 'done', 'dead')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    not_before_ms    INTEGER NOT NULL,   -- retry backoff: not delivered before this time
    enqueued_ms      INTEGER NOT NULL,
    leased_by        TEXT,
    lease_expires_ms INTEGER,
    reason           TEXT,               -- why it waits (shown to the caller)
    last_error       TEXT,
    finished_ms      INTEGER
);
CREATE INDEX queue_ready ON queue (state, lane_rank, priority DESC, enqueued_ms);
