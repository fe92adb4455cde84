-- Sandboxes placed on cluster nodes: which node runs it, its id there, and why it went there.
ALTER TABLE sandboxes ADD COLUMN node TEXT;
ALTER TABLE sandboxes ADD COLUMN remote_id TEXT;
ALTER TABLE sandboxes ADD COLUMN placement TEXT;
-- The key the control plane uses to reach a node's agent (sent by the agent at registration).
ALTER TABLE nodes ADD COLUMN api_key TEXT NOT NULL DEFAULT '';
