-- ANALYZE (autovacuum's, after every tenth of the log is new) spent three quarters of its time
-- on statistics for columns no statement filters, joins or orders by: the payload and
-- metadata (jsonb, sorted and compared value by value), the event's id (its unique index is
-- all the planner needs), its version and its time. Measured on 60,000 events: 620 ms, and
-- 155 ms without them, CPU taken from the appends, the relay and the projectors while it ran.
-- The columns the log is read by (position, transaction, aggregate, sequence, type) keep
-- theirs.
ALTER TABLE events
    ALTER COLUMN payload SET STATISTICS 0,
    ALTER COLUMN metadata SET STATISTICS 0,
    ALTER COLUMN event_id SET STATISTICS 0,
    ALTER COLUMN event_version SET STATISTICS 0,
    ALTER COLUMN recorded_at SET STATISTICS 0;
ALTER TABLE snapshots ALTER COLUMN payload SET STATISTICS 0;
ALTER TABLE processed_commands ALTER COLUMN result SET STATISTICS 0;
