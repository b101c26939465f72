-- V7: compact backups. Additive and idempotent like V1-V6; pqmig's own
-- tables only.
--
-- One table per scope with typed columns (no JSONB document, no surrogate
-- key, no index, no foreign key), partitioned by job: a job's backups are
-- one partition, `pq_migration_backups_<scope>_<job id>`, created and
-- attached when the job starts (ATTACH takes only a SHARE UPDATE EXCLUSIVE
-- lock on the parent), written directly by the job's batches in the
-- statement that replaces the values, read by `verify` and `rollback` in
-- heap-block order (TID range scans, so no index is needed), and dropped
-- whole by `purge-backups` (O(1) whatever the job's size, no bloat).
--
-- `pq_migration_backups` (SPEC §3) keeps the backups written before this
-- version; verify, rollback and purge read both, so a job finished (or
-- running) before the upgrade behaves exactly as before.

-- A hashes job: the replaced lookup hash and its key version.
CREATE TABLE IF NOT EXISTS pq_migration_backups_hashes (
    job_id  BIGINT NOT NULL,
    item_id BIGINT NOT NULL,
    hash    BYTEA NOT NULL,
    version TEXT NOT NULL
) PARTITION BY LIST (job_id);

-- A wrappers job: the columns a re-wrap replaces, and the wrapper's PQ
-- layers as they were (NULL: it had none; else the rows as to_jsonb writes
-- them, restored with jsonb_populate_recordset).
CREATE TABLE IF NOT EXISTS pq_migration_backups_wrappers (
    job_id       BIGINT NOT NULL,
    item_id      BIGINT NOT NULL,
    wrap_version INT NOT NULL,
    rotated_at   TIMESTAMPTZ,
    dek_wrap1    BYTEA,
    dek_wrap2    BYTEA,
    crypto_suite JSONB,
    layers       JSONB
) PARTITION BY LIST (job_id);

-- A signatures job: the countersignature it inserted for a source row, and
-- the other sources of the same subject it stood for (NULL: none).
CREATE TABLE IF NOT EXISTS pq_migration_backups_signatures (
    job_id              BIGINT NOT NULL,
    item_id             BIGINT NOT NULL,
    countersignature_id BIGINT NOT NULL,
    duplicate_sources   BIGINT[]
) PARTITION BY LIST (job_id);

-- Every backup, old and compact, in the shape of SPEC §3's
-- pq_migration_backups (created_at is NULL for compact rows): for
-- operators and outside tools that read backups.
CREATE OR REPLACE VIEW pq_migration_backups_all AS
    SELECT job_id, item_table, item_id, data, created_at FROM pq_migration_backups
    UNION ALL
    SELECT b.job_id, COALESCE(j.selection->>'table', 'users'), b.item_id::text,
           jsonb_build_object('value_hex', encode(b.hash, 'hex'), 'version', b.version), NULL::timestamptz
    FROM pq_migration_backups_hashes b LEFT JOIN pq_migration_jobs j ON j.id = b.job_id
    UNION ALL
    SELECT b.job_id, 'key_wrappers', b.item_id::text,
           jsonb_build_object('row', jsonb_build_object('id', b.item_id, 'wrap_version', b.wrap_version,
                                  'rotated_at', b.rotated_at, 'dek_wrap1', b.dek_wrap1,
                                  'dek_wrap2', b.dek_wrap2, 'crypto_suite', b.crypto_suite),
                              'layers', COALESCE(b.layers, '[]'::jsonb)),
           NULL::timestamptz
    FROM pq_migration_backups_wrappers b
    UNION ALL
    SELECT b.job_id, 'signatures', b.item_id::text,
           jsonb_build_object('countersignature_id', b.countersignature_id)
             || CASE WHEN b.duplicate_sources IS NULL THEN '{}'::jsonb
                     ELSE jsonb_build_object('duplicate_sources', to_jsonb(b.duplicate_sources)) END,
           NULL::timestamptz
    FROM pq_migration_backups_signatures b;

-- The daemon's role needs no DDL right for this: it creates a job's
-- partition and drops it through these two functions, which run as the
-- owner of the tables (the role that ran `pqmig migrate`) and take only a
-- scope name and a job id. Grant EXECUTE to pqmig's role (README,
-- "Database role"). Reads go through the parent tables (pruned to the
-- job's partition); writes go to the partition, on which the creating
-- function grants SELECT and INSERT to the roles that may insert into the
-- parent at that moment.
--
-- Hardening (SECURITY DEFINER): the search_path is pinned to pg_catalog,
-- the schema migrated, and pg_temp last (set below), so neither a function
-- or operator planted in a schema the caller can write nor a temporary
-- table can stand in for what the bodies use; every call and cast in them
-- is spelled with exact types.
CREATE OR REPLACE FUNCTION pqmig_backup_partition(scope TEXT, job BIGINT) RETURNS VOID
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    parent TEXT;
    part TEXT;
    sch TEXT;
    who TEXT;
BEGIN
    IF scope IS NULL OR scope NOT IN ('hashes', 'wrappers', 'signatures') OR job IS NULL THEN
        RAISE EXCEPTION 'pqmig_backup_partition: no scope %', scope;
    END IF;
    parent := pg_catalog.concat('pq_migration_backups_', scope);
    part := pg_catalog.concat(parent, '_', job::text);
    -- Where the parent is (the schema migrated): every name below is
    -- qualified with it, pg_catalog being first on the search_path.
    SELECT n.nspname::text INTO STRICT sch
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = pg_catalog.to_regclass(parent);
    -- Replicas starting the same job at once: one creates, the others wait.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(part, 0::bigint));
    PERFORM pg_catalog.set_config('lock_timeout', '10s', true);
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits
                   WHERE inhrelid = pg_catalog.to_regclass(part)
                     AND inhparent = pg_catalog.to_regclass(parent)) THEN
        -- A table left detached is attached again with its rows (the job's).
        EXECUTE pg_catalog.format('CREATE TABLE IF NOT EXISTS %I.%I (LIKE %I.%I)', sch, part, sch, parent);
        -- SHARE UPDATE EXCLUSIVE on the parent: other jobs' batches go on.
        EXECUTE pg_catalog.format('ALTER TABLE %I.%I ATTACH PARTITION %I.%I FOR VALUES IN (%s)',
                                  sch, parent, sch, part, job::text);
        -- Batches insert into the partition itself (routing each row
        -- through the parent costs about a sixth of a hashes job's
        -- throughput): whoever may insert into the parent may here too.
        FOR who IN
            SELECT DISTINCT CASE WHEN a.grantee = 0::oid THEN 'PUBLIC'
                                 ELSE pg_catalog.quote_ident(r.rolname::text) END
            FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
                 LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
            WHERE c.oid = pg_catalog.to_regclass(parent) AND a.privilege_type = 'INSERT'
        LOOP
            EXECUTE pg_catalog.format('GRANT SELECT, INSERT ON %I.%I TO %s', sch, part, who);
        END LOOP;
    END IF;
END $$;

-- Drop a job's partition whatever its size: its rows (counted when the
-- partition is under 256 MiB, else the statistics' estimate: counting a
-- hundred million rows would take longer than the drop) and whether that
-- count is exact; no row when it had none. A partition holding backups is
-- dropped only for a job that exists and is `done` (its row locked while
-- this runs; that it was verified is `purge-backups`'s check); an empty
-- one also for a job that is gone or finished otherwise (never while the
-- job is pending or running: its batches may be about to write). DROP
-- takes an ACCESS EXCLUSIVE lock on the parent for an instant (other jobs'
-- backup inserts wait for it), bounded by a 10 s lock_timeout.
CREATE OR REPLACE FUNCTION pqmig_drop_backup_partition(scope TEXT, job BIGINT)
RETURNS TABLE (backups BIGINT, exact BOOLEAN)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    part TEXT;
    sch TEXT;
    job_status TEXT;
    has_rows BOOLEAN;
BEGIN
    IF scope IS NULL OR scope NOT IN ('hashes', 'wrappers', 'signatures') OR job IS NULL THEN
        RAISE EXCEPTION 'pqmig_drop_backup_partition: no scope %', scope;
    END IF;
    part := pg_catalog.concat('pq_migration_backups_', scope, '_', job::text);
    SELECT n.nspname::text INTO sch
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = pg_catalog.to_regclass(part);
    IF sch IS NULL THEN
        RETURN;
    END IF;
    EXECUTE pg_catalog.format('SELECT j.status FROM %I.pq_migration_jobs j WHERE j.id = $1 FOR SHARE', sch)
        INTO job_status USING job;
    EXECUTE pg_catalog.format('SELECT EXISTS (SELECT 1 FROM %I.%I)', sch, part) INTO has_rows;
    IF job_status IN ('pending', 'running') THEN
        RAISE EXCEPTION 'job % is %: its backups are the only way back', job, job_status;
    END IF;
    IF has_rows AND job_status IS DISTINCT FROM 'done' THEN
        RAISE EXCEPTION 'job % is %: only the backups of a done job are dropped',
            job, COALESCE(job_status, 'gone');
    END IF;
    IF pg_catalog.pg_relation_size(pg_catalog.to_regclass(part)) <= 268435456::bigint THEN
        EXECUTE pg_catalog.format('SELECT count(*) FROM %I.%I', sch, part) INTO backups;
        exact := true;
    ELSE
        SELECT GREATEST(c.reltuples, 0::real)::bigint INTO backups
        FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass(part);
        exact := false;
    END IF;
    PERFORM pg_catalog.set_config('lock_timeout', '10s', true);
    EXECUTE pg_catalog.format('DROP TABLE %I.%I', sch, part);
    RETURN NEXT;
END $$;

-- A job whose partition holds backups cannot be deleted (by hand, or by
-- the janitor of a pqmig from before V7, which looks for backups only in
-- pq_migration_backups): they are the only way back, and rolling back
-- needs the job.
CREATE OR REPLACE FUNCTION pqmig_job_keeps_its_backups() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    scope TEXT;
    has_rows BOOLEAN;
BEGIN
    FOREACH scope IN ARRAY ARRAY['hashes', 'wrappers', 'signatures'] LOOP
        IF pg_catalog.to_regclass(pg_catalog.format('%I.%I', TG_TABLE_SCHEMA,
               pg_catalog.concat('pq_migration_backups_', scope, '_', OLD.id::text))) IS NOT NULL THEN
            EXECUTE pg_catalog.format('SELECT EXISTS (SELECT 1 FROM %I.%I)', TG_TABLE_SCHEMA,
                                      pg_catalog.concat('pq_migration_backups_', scope, '_', OLD.id::text))
                INTO has_rows;
            IF has_rows THEN
                RAISE EXCEPTION 'job % has backups (%): purge them first (pqmig purge-backups %)',
                    OLD.id, pg_catalog.concat('pq_migration_backups_', scope, '_', OLD.id::text), OLD.id;
            END IF;
        END IF;
    END LOOP;
    RETURN OLD;
END $$;

DROP TRIGGER IF EXISTS trg_pq_mig_job_keeps_its_backups ON pq_migration_jobs;
CREATE TRIGGER trg_pq_mig_job_keeps_its_backups BEFORE DELETE ON pq_migration_jobs
    FOR EACH ROW EXECUTE FUNCTION pqmig_job_keeps_its_backups();

DO $$
BEGIN
    EXECUTE pg_catalog.format(
        'ALTER FUNCTION pqmig_backup_partition(TEXT, BIGINT) SET search_path = pg_catalog, %I, pg_temp',
        pg_catalog.current_schema());
    EXECUTE pg_catalog.format(
        'ALTER FUNCTION pqmig_drop_backup_partition(TEXT, BIGINT) SET search_path = pg_catalog, %I, pg_temp',
        pg_catalog.current_schema());
    EXECUTE pg_catalog.format(
        'ALTER FUNCTION pqmig_job_keeps_its_backups() SET search_path = pg_catalog, %I, pg_temp',
        pg_catalog.current_schema());
END $$;

REVOKE ALL ON FUNCTION pqmig_backup_partition(TEXT, BIGINT) FROM PUBLIC;
REVOKE ALL ON FUNCTION pqmig_drop_backup_partition(TEXT, BIGINT) FROM PUBLIC;
