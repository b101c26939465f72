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
