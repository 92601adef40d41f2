-- Rebuilt generations of the SQL user view had their email index twice: once copied from
-- `read_users_g1` (named `<table>_email_idx`) and once made by name (`<table>_email`), and
-- every write kept both up. Drop the copy where the named one exists.
DO $$
DECLARE
    duplicate record;
BEGIN
    FOR duplicate IN
        SELECT copy.relname AS name
        FROM pg_index i
        JOIN pg_class copy ON copy.oid = i.indexrelid
        JOIN pg_class t ON t.oid = i.indrelid
        WHERE t.relname ~ '^read_users_g[0-9]+$'
          AND t.relnamespace = current_schema()::regnamespace
          AND copy.relname = t.relname || '_email_idx'
          AND EXISTS (
              SELECT 1 FROM pg_class named
              WHERE named.relname = t.relname || '_email'
                AND named.relnamespace = t.relnamespace
          )
    LOOP
        EXECUTE format('DROP INDEX %I', duplicate.name);
    END LOOP;
END
$$;
