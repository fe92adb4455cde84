-- Template ids are per tenant: two tenants may each have a template "py", and creating one tells nothing
-- about the other's. The owner is part of the key; '' is a shared template (created by an admin, seen by
-- every tenant), which the store reads back as a NULL tenant. Tenant names are never empty.
CREATE TABLE templates_new (
    tenant      TEXT NOT NULL,
    id          TEXT NOT NULL,
    definition  TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant, id)
);
INSERT INTO templates_new (rowid, tenant, id, definition, created_ms, updated_ms)
    SELECT rowid, COALESCE(tenant, ''), id, definition, created_ms, updated_ms FROM templates;
DROP TABLE templates;
ALTER TABLE templates_new RENAME TO templates;
