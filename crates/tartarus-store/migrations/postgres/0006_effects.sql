-- Verifiable effects: declared tools, the idempotency ledger, receipts, traces, episodes, signals, datasets.

-- Tools the operator declared, reached by sandboxes only through the gateway.
CREATE TABLE tools (
    name        TEXT PRIMARY KEY,
    definition  TEXT NOT NULL,      -- JSON, validated by the server
    created_ms  BIGINT NOT NULL
);

-- The idempotency ledger: one row per (tenant, idempotency key), register -> commit under a lease.
-- `epoch` is the fencing token: a takeover of an expired lease increments it, and a commit or abort
-- counts only with the epoch the holder was given.
CREATE TABLE ledger (
    tenant           TEXT NOT NULL,
    key              TEXT NOT NULL,
    tool             TEXT NOT NULL,
    request_hash     TEXT NOT NULL,  -- raw CID of the request body
    state            TEXT NOT NULL,  -- 'registered' or 'committed'
    epoch            BIGINT NOT NULL,
    holder           TEXT NOT NULL,
    lease_expires_ms BIGINT NOT NULL,
    created_ms       BIGINT NOT NULL,
    committed_ms     BIGINT,
    response_code    BIGINT,        -- the HTTP status the gateway answered with
    response_type    TEXT,
    response_body    BYTEA,
    receipt          TEXT,           -- the receipt's id
    divergences      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, key)
);

-- Signed receipts, one per tool invocation (replays return the original receipt).
CREATE TABLE receipts (
    id              TEXT PRIMARY KEY,   -- CID of the envelope bytes
    tenant          TEXT NOT NULL,
    sandbox         TEXT NOT NULL,
    tool            TEXT NOT NULL,
    status          TEXT NOT NULL,
    idempotency_key TEXT,
    created_ms      BIGINT NOT NULL,
    envelope        BYTEA NOT NULL,
    rowid           BIGINT GENERATED ALWAYS AS IDENTITY  -- insertion order (SQLite's implicit rowid)
);
CREATE INDEX receipts_tenant ON receipts (tenant, created_ms);
CREATE INDEX receipts_sandbox ON receipts (sandbox, created_ms);

-- Trace records of sandbox runs, execs and tool calls, as canonical DAG-CBOR.
CREATE TABLE trace_records (
    sandbox     TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    tenant      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    at_ms       BIGINT NOT NULL,
    record      BYTEA NOT NULL,
    PRIMARY KEY (sandbox, seq)
);

-- Sealed episodes: one per ended sandbox, a server-signed envelope over the episode object.
CREATE TABLE episodes (
    id          TEXT PRIMARY KEY,   -- CID of the envelope bytes
    sandbox     TEXT NOT NULL UNIQUE,
    tenant      TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    envelope    BYTEA NOT NULL,
    facts       TEXT NOT NULL       -- JSON: the episode's queryable fields (signals are joined at query time)
);
CREATE INDEX episodes_tenant ON episodes (tenant, created_ms);

-- Public keys of evaluators allowed to sign signals.
CREATE TABLE evaluators (
    name        TEXT NOT NULL,
    kid         TEXT NOT NULL,
    public_key  TEXT NOT NULL,      -- 64 hex digits
    created_ms  BIGINT NOT NULL,
    PRIMARY KEY (name, kid)
);

-- Signals: evaluator-signed feedback on an episode, verified before insertion.
CREATE TABLE signals (
    id          TEXT PRIMARY KEY,   -- CID of the envelope bytes
    episode     TEXT NOT NULL REFERENCES episodes (id),
    tenant      TEXT NOT NULL,
    evaluator   TEXT NOT NULL,
    name        TEXT NOT NULL,
    score       BIGINT,
    label       TEXT,
    at_ms       BIGINT NOT NULL,
    envelope    BYTEA NOT NULL
);
CREATE INDEX signals_episode ON signals (episode);

-- Built datasets: the manifest is a blob; this is the index of them.
CREATE TABLE datasets (
    id          TEXT NOT NULL,      -- raw CID of the manifest blob
    tenant      TEXT NOT NULL,
    query       TEXT NOT NULL,
    episodes    BIGINT NOT NULL,
    created_ms  BIGINT NOT NULL,
    PRIMARY KEY (tenant, id)
);
