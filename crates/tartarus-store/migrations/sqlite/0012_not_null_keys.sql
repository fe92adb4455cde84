-- SQLite lets a TEXT PRIMARY KEY hold NULL (the SQL standard and PostgreSQL do not): each table keyed by
-- one TEXT column is rebuilt with that column NOT NULL, the way SQLite documents for a changed constraint
-- (a new table, the rows copied with their rowids, which queries order by, the old table dropped, the new
-- one renamed, its indexes made again). The store runs SQLite migrations with foreign keys off, and
-- checks them afterwards: signals refer to episodes.

CREATE TABLE api_keys_new (
    id          TEXT NOT NULL PRIMARY KEY,
    tenant      TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'user', 'viewer')),
    key_hash    BLOB NOT NULL UNIQUE,
    created_ms  INTEGER NOT NULL,
    revoked_ms  INTEGER
);
INSERT INTO api_keys_new (rowid, id, tenant, role, key_hash, created_ms, revoked_ms)
    SELECT rowid, id, tenant, role, key_hash, created_ms, revoked_ms FROM api_keys;
DROP TABLE api_keys;
ALTER TABLE api_keys_new RENAME TO api_keys;
CREATE INDEX api_keys_tenant ON api_keys (tenant);

CREATE TABLE sandboxes_new (
    id           TEXT NOT NULL PRIMARY KEY,
    tenant       TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('starting', 'running', 'exited', 'killed', 'failed', 'lost')),
    template     TEXT,
    spec         TEXT NOT NULL,
    labels       TEXT NOT NULL DEFAULT '{}',
    created_ms   INTEGER NOT NULL,
    finished_ms  INTEGER,
    exit_code    INTEGER,
    reason       TEXT,
    shim_pid     INTEGER,
    dir          TEXT NOT NULL,
    paused       INTEGER NOT NULL DEFAULT 0,
    node         TEXT,
    remote_id    TEXT,
    placement    TEXT
);
INSERT INTO sandboxes_new (rowid, id, tenant, status, template, spec, labels, created_ms, finished_ms,
                           exit_code, reason, shim_pid, dir, paused, node, remote_id, placement)
    SELECT rowid, id, tenant, status, template, spec, labels, created_ms, finished_ms,
           exit_code, reason, shim_pid, dir, paused, node, remote_id, placement FROM sandboxes;
DROP TABLE sandboxes;
ALTER TABLE sandboxes_new RENAME TO sandboxes;
CREATE INDEX sandboxes_tenant_status ON sandboxes (tenant, status);

CREATE TABLE templates_new (
    id          TEXT NOT NULL PRIMARY KEY,
    tenant      TEXT,
    definition  TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);
INSERT INTO templates_new (rowid, id, tenant, definition, created_ms, updated_ms)
    SELECT rowid, id, tenant, definition, created_ms, updated_ms FROM templates;
DROP TABLE templates;
ALTER TABLE templates_new RENAME TO templates;
CREATE INDEX templates_tenant ON templates (tenant);

CREATE TABLE tools_new (
    name        TEXT NOT NULL PRIMARY KEY,
    definition  TEXT NOT NULL,      -- JSON, validated by the server
    created_ms  INTEGER NOT NULL
);
INSERT INTO tools_new (rowid, name, definition, created_ms)
    SELECT rowid, name, definition, created_ms FROM tools;
DROP TABLE tools;
ALTER TABLE tools_new RENAME TO tools;

CREATE TABLE receipts_new (
    id              TEXT NOT NULL PRIMARY KEY,   -- CID of the envelope bytes
    tenant          TEXT NOT NULL,
    sandbox         TEXT NOT NULL,
    tool            TEXT NOT NULL,
    status          TEXT NOT NULL,
    idempotency_key TEXT,
    created_ms      INTEGER NOT NULL,
    envelope        BLOB NOT NULL
);
INSERT INTO receipts_new (rowid, id, tenant, sandbox, tool, status, idempotency_key, created_ms, envelope)
    SELECT rowid, id, tenant, sandbox, tool, status, idempotency_key, created_ms, envelope FROM receipts;
DROP TABLE receipts;
ALTER TABLE receipts_new RENAME TO receipts;
CREATE INDEX receipts_tenant ON receipts (tenant, created_ms);
CREATE INDEX receipts_sandbox ON receipts (sandbox, created_ms);

CREATE TABLE episodes_new (
    id          TEXT NOT NULL PRIMARY KEY,   -- CID of the envelope bytes
    sandbox     TEXT NOT NULL UNIQUE,
    tenant      TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    envelope    BLOB NOT NULL,
    facts       TEXT NOT NULL       -- JSON: the episode's queryable fields (signals are joined at query time)
);
INSERT INTO episodes_new (rowid, id, sandbox, tenant, created_ms, envelope, facts)
    SELECT rowid, id, sandbox, tenant, created_ms, envelope, facts FROM episodes;
DROP TABLE episodes;
ALTER TABLE episodes_new RENAME TO episodes;
CREATE INDEX episodes_tenant ON episodes (tenant, created_ms);

CREATE TABLE signals_new (
    id          TEXT NOT NULL PRIMARY KEY,   -- CID of the envelope bytes
    episode     TEXT NOT NULL REFERENCES episodes (id),
    tenant      TEXT NOT NULL,
    evaluator   TEXT NOT NULL,
    name        TEXT NOT NULL,
    score       INTEGER,
    label       TEXT,
    at_ms       INTEGER NOT NULL,
    envelope    BLOB NOT NULL
);
INSERT INTO signals_new (rowid, id, episode, tenant, evaluator, name, score, label, at_ms, envelope)
    SELECT rowid, id, episode, tenant, evaluator, name, score, label, at_ms, envelope FROM signals;
DROP TABLE signals;
ALTER TABLE signals_new RENAME TO signals;
CREATE INDEX signals_episode ON signals (episode);

CREATE TABLE queue_new (
    id               TEXT NOT NULL PRIMARY KEY,
    lane             TEXT NOT NULL CHECK (lane IN ('swift', 'main', 'deep')),
    lane_rank        INTEGER NOT NULL,   -- 0 swift, 1 main, 2 deep: dequeue order across lanes
    priority         INTEGER NOT NULL,   -- higher first within a lane
    tenant           TEXT NOT NULL,
    payload          TEXT NOT NULL,      -- the request (JSON)
    state            TEXT NOT NULL CHECK (state IN ('ready', 'leased', 'done', 'dead')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    not_before_ms    INTEGER NOT NULL,   -- retry backoff: not delivered before this time
    enqueued_ms      INTEGER NOT NULL,
    leased_by        TEXT,
    lease_expires_ms INTEGER,
    reason           TEXT,               -- why it waits (shown to the caller)
    last_error       TEXT,
    finished_ms      INTEGER,
    sandbox          TEXT                -- the sandbox it became, once dispatched
);
INSERT INTO queue_new (rowid, id, lane, lane_rank, priority, tenant, payload, state, attempts, max_attempts,
                       not_before_ms, enqueued_ms, leased_by, lease_expires_ms, reason, last_error,
                       finished_ms, sandbox)
    SELECT rowid, id, lane, lane_rank, priority, tenant, payload, state, attempts, max_attempts,
           not_before_ms, enqueued_ms, leased_by, lease_expires_ms, reason, last_error,
           finished_ms, sandbox FROM queue;
DROP TABLE queue;
ALTER TABLE queue_new RENAME TO queue;
CREATE INDEX queue_ready ON queue (state, lane_rank, priority DESC, enqueued_ms);

CREATE TABLE node_tokens_new (
    node_id     TEXT NOT NULL PRIMARY KEY,
    token_hash  BLOB NOT NULL UNIQUE,
    created_ms  INTEGER NOT NULL
);
INSERT INTO node_tokens_new (rowid, node_id, token_hash, created_ms)
    SELECT rowid, node_id, token_hash, created_ms FROM node_tokens;
DROP TABLE node_tokens;
ALTER TABLE node_tokens_new RENAME TO node_tokens;

CREATE TABLE nodes_new (
    id                TEXT NOT NULL PRIMARY KEY,
    instance          TEXT NOT NULL,      -- the agent process that holds the registration
    epoch             INTEGER NOT NULL,   -- +1 at each registration: a superseded agent's heartbeats are refused
    address           TEXT NOT NULL,
    labels            TEXT NOT NULL,      -- JSON object
    taints            TEXT NOT NULL,      -- JSON array
    capacity          TEXT NOT NULL,      -- JSON resources
    usage             TEXT NOT NULL,      -- JSON resources
    state             TEXT NOT NULL CHECK (state IN ('ready', 'unreachable', 'draining')),
    registered_ms     INTEGER NOT NULL,
    last_heartbeat_ms INTEGER NOT NULL,
    api_key           TEXT NOT NULL DEFAULT '',
    pools             TEXT NOT NULL DEFAULT '[]',
    quarantine        INTEGER NOT NULL DEFAULT 0
);
INSERT INTO nodes_new (rowid, id, instance, epoch, address, labels, taints, capacity, usage, state,
                       registered_ms, last_heartbeat_ms, api_key, pools, quarantine)
    SELECT rowid, id, instance, epoch, address, labels, taints, capacity, usage, state,
           registered_ms, last_heartbeat_ms, api_key, pools, quarantine FROM nodes;
DROP TABLE nodes;
ALTER TABLE nodes_new RENAME TO nodes;

CREATE TABLE leader_terms_new (
    name        TEXT NOT NULL PRIMARY KEY,
    term        INTEGER NOT NULL,
    holder      TEXT NOT NULL,
    since_ms    INTEGER NOT NULL
);
INSERT INTO leader_terms_new (rowid, name, term, holder, since_ms)
    SELECT rowid, name, term, holder, since_ms FROM leader_terms;
DROP TABLE leader_terms;
ALTER TABLE leader_terms_new RENAME TO leader_terms;
