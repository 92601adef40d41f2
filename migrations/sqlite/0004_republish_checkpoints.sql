-- `pcf events republish`: where each replay of the log onto a Kafka topic stands, per topic
-- and selection (see the PostgreSQL migration 0008). Embedded mode has no Kafka and never
-- writes it; the table keeps both schemas alike.
CREATE TABLE republish_checkpoints
(
    topic           TEXT    NOT NULL,
    selection       TEXT    NOT NULL,
    transaction_id  INTEGER NOT NULL DEFAULT 0,
    global_position INTEGER NOT NULL DEFAULT 0,
    published       INTEGER NOT NULL DEFAULT 0,
    state           TEXT    NOT NULL,
    error           TEXT,
    updated_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (topic, selection)
);
