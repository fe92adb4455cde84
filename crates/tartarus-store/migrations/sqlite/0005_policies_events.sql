-- Policies: every apply is a new revision; the highest revision of an id is in force unless it is a removal.
CREATE TABLE policies (
    id          TEXT NOT NULL,
    revision    INTEGER NOT NULL,
    document    TEXT NOT NULL,      -- the validated policy, canonical JSON ('' for a removal)
    source      TEXT NOT NULL,      -- the text as applied (YAML or JSON)
    created_ms  INTEGER NOT NULL,
    author      TEXT NOT NULL,      -- the applying key's tenant and key id
    rollback_of INTEGER,            -- the revision this one restores, for a rollback
    PRIMARY KEY (id, revision)
);

-- The structured event stream: enforcement actions, admission rejections, dead letters.
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms       INTEGER NOT NULL,
    category    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    sandbox     TEXT,
    tenant      TEXT,
    message     TEXT NOT NULL,
    details     TEXT
);
CREATE INDEX events_at ON events (at_ms);
CREATE INDEX events_tenant_at ON events (tenant, at_ms);
