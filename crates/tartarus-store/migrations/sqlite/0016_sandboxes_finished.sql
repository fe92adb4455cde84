-- Retention sweeps ended sandboxes in the order they ended, a page at a time.
CREATE INDEX sandboxes_finished ON sandboxes (finished_ms, id);
