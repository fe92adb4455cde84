-- What each sandbox used (issue 20, usage and cost): sampled while it runs, completed when it ends, kept
-- as long as its record. Memory is integrated over time from the samples (KiB-milliseconds, so integers
-- hold years of a large sandbox); CPU is the lane's own cumulative counter (microseconds).
CREATE TABLE sandbox_usage (
    id TEXT NOT NULL PRIMARY KEY REFERENCES sandboxes (id) ON DELETE CASCADE,
    cpu_usec BIGINT NOT NULL DEFAULT 0,
    memory_kib_ms BIGINT NOT NULL DEFAULT 0,
    -- The last memory reading (bytes) and when it was taken: the integral's next step starts there.
    memory_bytes BIGINT,
    sampled_ms BIGINT NOT NULL,
    peak_memory_bytes BIGINT,
    -- NULL where the lane does not count egress.
    egress_bytes BIGINT
);
