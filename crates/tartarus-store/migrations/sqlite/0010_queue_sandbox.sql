-- The sandbox a dispatched queue item became.
ALTER TABLE queue ADD COLUMN sandbox TEXT;
