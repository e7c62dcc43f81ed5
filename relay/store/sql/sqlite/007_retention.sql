-- The retention horizon (Stream-Retain-From): reads before it are 410 Gone; a fork inherits
-- its source's. Rows before it are deleted once no descendant fork can read them.
ALTER TABLE streams ADD COLUMN retained_from INTEGER NOT NULL DEFAULT 0;
