-- Cluster mode: node agents, their join tokens, and the control plane's leader terms.

-- One join token per node id, stored as a BLAKE3 hash; an agent proves its id with it.
CREATE TABLE node_tokens (
    node_id     TEXT PRIMARY KEY,
    token_hash  BYTEA NOT NULL UNIQUE,
    created_ms  BIGINT NOT NULL
);

-- Registered nodes as their agents last reported them.
CREATE TABLE nodes (
    id                TEXT PRIMARY KEY,
    instance          TEXT NOT NULL,      -- the agent process that holds the registration
    epoch             BIGINT NOT NULL,   -- +1 at each registration: a superseded agent's heartbeats are refused
    address           TEXT NOT NULL,
    labels            TEXT NOT NULL,      -- JSON object
    taints            TEXT NOT NULL,      -- JSON array
    capacity          TEXT NOT NULL,      -- JSON resources
    usage             TEXT NOT NULL,      -- JSON resources
    state             TEXT NOT NULL CHECK (state IN ('ready', 'unreachable', 'draining')),
    registered_ms     BIGINT NOT NULL,
    last_heartbeat_ms BIGINT NOT NULL
);

-- Leader terms of background loops (heartbeat reaper, dispatcher, GC): the holder's fencing token.
CREATE TABLE leader_terms (
    name        TEXT PRIMARY KEY,
    term        BIGINT NOT NULL,
    holder      TEXT NOT NULL,
    since_ms    BIGINT NOT NULL
);
