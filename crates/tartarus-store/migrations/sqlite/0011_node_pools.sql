-- Nodes dedicated to resource classes, and quarantine nodes.
ALTER TABLE nodes ADD COLUMN pools TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN quarantine INTEGER NOT NULL DEFAULT 0;
