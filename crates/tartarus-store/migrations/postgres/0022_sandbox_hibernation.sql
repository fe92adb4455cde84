-- A sandbox paused to disk: the directory of its sealed snapshot. It stays 'running' with `paused` set
-- and no shim; a resume continues it from there and clears this.
ALTER TABLE sandboxes ADD COLUMN hibernated_to TEXT;
