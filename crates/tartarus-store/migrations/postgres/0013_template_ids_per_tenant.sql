-- Template ids are per tenant: two tenants may each have a template "py", and creating one tells nothing
-- about the other's. The owner is part of the key; '' is a shared template (created by an admin, seen by
-- every tenant), which the store reads back as a NULL tenant. Tenant names are never empty.
UPDATE templates SET tenant = '' WHERE tenant IS NULL;
ALTER TABLE templates ALTER COLUMN tenant SET NOT NULL;
ALTER TABLE templates DROP CONSTRAINT templates_pkey;
ALTER TABLE templates ADD PRIMARY KEY (tenant, id);
DROP INDEX templates_tenant;
