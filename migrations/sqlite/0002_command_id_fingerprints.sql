-- A command id answers with its first result only for the same caller's same command, target
-- and input: the fingerprint of those (SHA-256, hex) is kept beside the id. Rows written
-- before this migration have none and match nothing.
ALTER TABLE processed_commands ADD COLUMN fingerprint TEXT;

-- Command ids are kept for a limited time (COMMAND_ID_RETENTION); pruning finds the expired
-- ones by their age.
CREATE INDEX processed_commands_recorded_at ON processed_commands (recorded_at);
