-- The isolation lane (the API's `runtime`) a sandbox runs on, and why it was chosen.
ALTER TABLE sandboxes ADD COLUMN runtime TEXT NOT NULL DEFAULT 'process';
ALTER TABLE sandboxes ADD COLUMN runtime_reason TEXT;
