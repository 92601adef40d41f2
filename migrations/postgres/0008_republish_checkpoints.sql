-- `pcf events republish`: where each replay of the log onto a Kafka topic stands, one row per
-- topic and selection (`--from`, `--to`, `--types`). `transaction_id, global_position` is the
-- last position whose delivery Kafka acknowledged (the start of the log until a batch is), so a run
-- that stops for any reason is resumed after it, never with a gap. `state` says whether the
-- run finished (`finished`), stopped (`interrupted`, with the `error`) or is, or was when it
-- died, publishing (`publishing`).
CREATE TABLE republish_checkpoints
(
    topic           text        NOT NULL,
    selection       text        NOT NULL,
    transaction_id  xid8        NOT NULL DEFAULT '0',
    global_position bigint      NOT NULL DEFAULT 0,
    published       bigint      NOT NULL DEFAULT 0,
    state           text        NOT NULL,
    error           text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, selection)
);
