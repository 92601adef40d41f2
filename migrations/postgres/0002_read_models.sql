-- The SQL user view: one table per generation behind the stable view `read_users`. A
-- rebuild creates `read_users_g<N+1>` like this one and switches the view in one transaction.
CREATE TABLE read_users_g1
(
    id           uuid PRIMARY KEY,
    email        text        NOT NULL,
    display_name text        NOT NULL,
    bio          text,
    avatar_url   text,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    version      bigint      NOT NULL,
    deleted      boolean     NOT NULL
);
CREATE INDEX read_users_g1_email ON read_users_g1 (email) WHERE NOT deleted;

CREATE VIEW read_users AS SELECT * FROM read_users_g1;

-- Which generation of each projection readers use, and which one a rebuild is writing.
CREATE TABLE projection_generations
(
    projection text PRIMARY KEY,
    active     bigint NOT NULL,
    building   bigint
);
INSERT INTO projection_generations (projection, active) VALUES ('users-sql', 1);

-- How far a SQL projection has applied each partition, written in the same transaction as
-- the rows it applied.
CREATE TABLE projection_checkpoints
(
    projection  text        NOT NULL,
    generation  bigint      NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, generation, partition)
);
