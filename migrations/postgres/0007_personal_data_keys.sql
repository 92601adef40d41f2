-- Personal data sealed per user (crypto-shredding). Each user's data key, wrapped by a
-- key-encryption key (KEK) from configuration: inserted in the transaction of `UserCreated`,
-- deleted in the transaction of `AccountDeleted`. Without its row, the user's sealed fields
-- (in the events, on Kafka, in any backup) cannot be opened by anyone.
CREATE TABLE user_keys
(
    user_id    text PRIMARY KEY,
    kek_id     text        NOT NULL,
    wrapped    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- `pcf keys rotate` finds the keys still wrapped by an older KEK.
CREATE INDEX user_keys_kek_id ON user_keys (kek_id);

-- One check value per KEK that ever wrapped a key: it opens only with that KEK, so that a
-- process started with a wrong KEK is told from a damaged key row.
CREATE TABLE kek_checks
(
    kek_id      text PRIMARY KEY,
    check_value bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
