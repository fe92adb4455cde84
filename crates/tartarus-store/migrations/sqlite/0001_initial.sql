-- API keys: only a BLAKE3 hash of each secret is stored. Roles: admin, user, viewer.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'user', 'viewer')),
    key_hash    BLOB NOT NULL UNIQUE,
    created_ms  INTEGER NOT NULL,
    revoked_ms  INTEGER
);
CREATE INDEX api_keys_tenant ON api_keys (tenant);

-- Every mutating call and every authentication decision worth keeping.
CREATE TABLE audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms       INTEGER NOT NULL,
    tenant      TEXT NOT NULL,
    key_id      TEXT,
    action      TEXT NOT NULL,
    target      TEXT,
    outcome     TEXT NOT NULL,
    detail      TEXT
);
CREATE INDEX audit_tenant_at ON audit (tenant, at_ms);
