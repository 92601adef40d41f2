-- A command id answers with its first result only for the same caller's same command, target
-- and input: the fingerprint of those (SHA-256, hex) is kept beside the id. Rows written
-- before this migration have none and match nothing.
ALTER TABLE processed_commands ADD COLUMN fingerprint text;

-- Command ids are kept for a limited time (COMMAND_ID_RETENTION); pruning finds the expired
-- ones by their age. Rows are inserted in about time order, so the index grows at its end.
CREATE INDEX processed_commands_recorded_at ON processed_commands (recorded_at);
