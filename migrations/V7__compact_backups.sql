-- V7: compact backups. Additive and idempotent like V1-V6; pqmig's own
-- tables only.
--
-- One table per scope with typed columns (no JSONB document, no surrogate
-- key, no index, no foreign key), partitioned by job: a job's backups are
-- one partition, `pq_migration_backups_<scope>_<job id>`, created and
-- attached when the job starts (ATTACH takes only a SHARE UPDATE EXCLUSIVE
-- lock on the parent), written directly by the job's batches in the
-- statement that replaces the values, read by `verify` and `rollback` in
-- heap-block order (TID range scans, so no index is needed), and detached
-- and dropped by `purge-backups` (O(1) whatever the job's size, no bloat).
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
-- owner of the tables (the role that ran `pqmig migrate`), with a fixed
-- search_path, and take only a scope name and a job id. Grant EXECUTE to
-- pqmig's role (README, "Database role"). Reads go through the parent
-- tables (pruned to the job's partition); writes go to the partition, on
-- which the creating function grants what the parent grants.
CREATE OR REPLACE FUNCTION pqmig_backup_partition(scope TEXT, job BIGINT) RETURNS VOID
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    parent TEXT := 'pq_migration_backups_' || scope;
    part TEXT := 'pq_migration_backups_' || scope || '_' || job;
    who TEXT;
BEGIN
    IF scope IS NULL OR scope NOT IN ('hashes', 'wrappers', 'signatures') OR job IS NULL THEN
        RAISE EXCEPTION 'pqmig_backup_partition: no scope %', scope;
    END IF;
    -- Replicas starting the same job at once: one creates, the others wait.
    PERFORM pg_advisory_xact_lock(hashtextextended(part, 0));
    PERFORM set_config('lock_timeout', '10s', true);
    IF NOT EXISTS (SELECT 1 FROM pg_inherits
                   WHERE inhrelid = to_regclass(part) AND inhparent = to_regclass(parent)) THEN
        -- A table left detached is attached again with its rows (the job's).
        EXECUTE format('CREATE TABLE IF NOT EXISTS %I (LIKE %I)', part, parent);
        -- SHARE UPDATE EXCLUSIVE on the parent: other jobs' batches go on.
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES IN (%s)', parent, part, job);
        -- Batches insert into the partition itself (routing each row
        -- through the parent costs about a sixth of a hashes job's
        -- throughput): whoever may insert into the parent may here too.
        FOR who IN
            SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END
            FROM pg_class c, aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
            WHERE c.oid = to_regclass(parent) AND a.privilege_type = 'INSERT'
        LOOP
            EXECUTE format('GRANT SELECT, INSERT ON %I TO %s', part, who);
        END LOOP;
    END IF;
END $$;

-- Drop a job's partition whatever its size: its rows (counted when the
-- partition is under 256 MiB, else the statistics' estimate: counting a
-- hundred million rows would take longer than the drop) and whether that
-- count is exact; no row when it had none. Refused unless the job is done
-- or gone: the checks that it was verified are `purge-backups`'s, this one
-- holds whoever calls. DROP takes an ACCESS EXCLUSIVE lock on the parent
-- for an instant (other jobs' batches wait for it), bounded by a 10 s
-- lock_timeout.
CREATE OR REPLACE FUNCTION pqmig_drop_backup_partition(scope TEXT, job BIGINT)
RETURNS TABLE (backups BIGINT, exact BOOLEAN)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    part TEXT := 'pq_migration_backups_' || scope || '_' || job;
    job_status TEXT;
BEGIN
    IF scope IS NULL OR scope NOT IN ('hashes', 'wrappers', 'signatures') OR job IS NULL THEN
        RAISE EXCEPTION 'pqmig_drop_backup_partition: no scope %', scope;
    END IF;
    IF to_regclass(part) IS NULL THEN
        RETURN;
    END IF;
    SELECT j.status INTO job_status FROM pq_migration_jobs j WHERE j.id = job;
    IF FOUND AND job_status <> 'done' THEN
        RAISE EXCEPTION 'job % is %: only the backups of a done job are dropped', job, job_status;
    END IF;
    IF pg_relation_size(to_regclass(part)) <= 256 * 1024 * 1024 THEN
        EXECUTE format('SELECT count(*) FROM %I', part) INTO backups;
        exact := true;
    ELSE
        SELECT GREATEST(c.reltuples, 0)::bigint INTO backups FROM pg_class c WHERE c.oid = to_regclass(part);
        exact := false;
    END IF;
    PERFORM set_config('lock_timeout', '10s', true);
    EXECUTE format('DROP TABLE %I', part);
    RETURN NEXT;
END $$;

REVOKE ALL ON FUNCTION pqmig_backup_partition(TEXT, BIGINT) FROM PUBLIC;
REVOKE ALL ON FUNCTION pqmig_drop_backup_partition(TEXT, BIGINT) FROM PUBLIC;
