-- A running sandbox can be paused (cgroup freezer); it stays 'running' with this flag set.
ALTER TABLE sandboxes ADD COLUMN paused BIGINT NOT NULL DEFAULT 0;
