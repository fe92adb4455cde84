-- The isolation lanes a node's agent reports it can run (JSON: [{"name", "version"}]); empty for an agent
-- that reports none (one from before lanes were reported, which runs the process lane).
ALTER TABLE nodes ADD COLUMN lanes TEXT NOT NULL DEFAULT '[]';
