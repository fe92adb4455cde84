-- Templates: an image plus the defaults and warm-up of sandboxes made from it. The definition is the
-- template's canonical JSON, validated and read by the server; a NULL tenant means every tenant sees it.
CREATE TABLE templates (
    id          TEXT PRIMARY KEY,
    tenant      TEXT,
    definition  TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    updated_ms  BIGINT NOT NULL
);
CREATE INDEX templates_tenant ON templates (tenant);
