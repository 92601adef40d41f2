-- The event store: postgres-es's `events` and `snapshots` tables, with the columns the relay
-- and the envelope need. postgres-es inserts only its own columns; the rest have defaults.
CREATE TABLE events
(
    aggregate_type  text                         NOT NULL,
    aggregate_id    text                         NOT NULL,
    sequence        bigint CHECK (sequence >= 0) NOT NULL,
    event_type      text                         NOT NULL,
    event_version   text                         NOT NULL,
    payload         jsonb                        NOT NULL,
    metadata        jsonb                        NOT NULL,
    event_id        uuid                         NOT NULL DEFAULT gen_random_uuid(),
    global_position bigint GENERATED ALWAYS AS IDENTITY,
    -- The writing transaction: the relay reads in (transaction_id, global_position) order,
    -- only below the oldest running transaction, so a late commit is never skipped.
    transaction_id  xid8                         NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz                  NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE UNIQUE INDEX events_event_id ON events (event_id);
CREATE UNIQUE INDEX events_global_position ON events (global_position);
CREATE INDEX events_commit_order ON events (transaction_id, global_position);

CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          jsonb                                NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- Live accounts' emails, maintained in the same transaction as the events that change them.
-- The primary key is what makes "no two live accounts share an email" true under concurrency.
CREATE TABLE user_emails
(
    email   text PRIMARY KEY,
    user_id text NOT NULL
);
CREATE INDEX user_emails_user_id ON user_emails (user_id);

-- Commands already executed, by their client-supplied id, with the result they returned.
CREATE TABLE processed_commands
(
    command_id   text PRIMARY KEY,
    aggregate_id text        NOT NULL,
    result       jsonb,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);

-- How far each relay has published.
CREATE TABLE relay_checkpoints
(
    name            text PRIMARY KEY,
    transaction_id  xid8        NOT NULL,
    global_position bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Wakes relays and subscribers as soon as events commit (NOTIFY is delivered at commit).
CREATE FUNCTION pcf_notify_events() RETURNS trigger AS
$$
BEGIN
    PERFORM pg_notify('pcf_events', '');
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER events_notify
    AFTER INSERT
    ON events
    FOR EACH STATEMENT
EXECUTE FUNCTION pcf_notify_events();
