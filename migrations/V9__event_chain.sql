-- V9: a tamper-evident audit trail. Each job's events form a hash chain:
-- every event inserted from now on carries its place in the job's chain
-- (`chain_no`, from 1), the hash of the event before it (`prev_hash`, NULL
-- for the first) and its own `hash`, computed by the trigger below in the
-- transaction that inserts it. `pqmig audit verify [JOB]` recomputes every
-- chain and names the first broken link. Rows from before V9 have no hash:
-- they are reported as unchained, not as broken. Additive and idempotent
-- like V1-V8; pqmig's own tables only (building the index below holds
-- writes to the events table for the length of the build).
--
-- hash = sha256(canonical), canonical being, for each of
--   'pqmig-event-v1', chain_no, job_id, event, worker, detail (jsonb as
--   text), created_at (UTC, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), prev_hash (hex)
-- the field's UTF-8 length in decimal, ':', the field, ',' -- or '-,' for
-- NULL. (README "Audit trail" has the same definition for other tools.)

ALTER TABLE pq_migration_job_events
    ADD COLUMN IF NOT EXISTS chain_no BIGINT,
    ADD COLUMN IF NOT EXISTS prev_hash BYTEA,
    ADD COLUMN IF NOT EXISTS hash BYTEA;

CREATE INDEX IF NOT EXISTS idx_pq_mig_job_events_chain
    ON pq_migration_job_events (job_id, chain_no);

CREATE OR REPLACE FUNCTION pqmig_event_field(t text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog
AS $fn$
    SELECT CASE WHEN t IS NULL THEN '-,' ELSE octet_length(t)::text || ':' || t || ',' END
$fn$;

CREATE OR REPLACE FUNCTION pqmig_event_canonical(
    chain_no bigint, job_id bigint, event text, worker text, detail jsonb,
    created_at timestamptz, prev_hash bytea) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE
AS $fn$
    SELECT convert_to(
        pqmig_event_field('pqmig-event-v1')
        || pqmig_event_field(chain_no::text)
        || pqmig_event_field(job_id::text)
        || pqmig_event_field(event)
        || pqmig_event_field(worker)
        || pqmig_event_field(detail::text)
        || pqmig_event_field(to_char(created_at AT TIME ZONE 'UTC',
                                     'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
        || pqmig_event_field(encode(prev_hash, 'hex')),
        'UTF8')
$fn$;

-- Chained one event at a time per job: a transaction-scoped advisory lock
-- on the job (the two-key space, class 'pqev') orders concurrent inserts;
-- the chain's order is chain_no, not id.
CREATE OR REPLACE FUNCTION pqmig_event_chain() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    last_no bigint;
    last_hash bytea;
BEGIN
    PERFORM pg_advisory_xact_lock(1886545270, (NEW.job_id % 2147483647)::int);
    SELECT e.chain_no, e.hash INTO last_no, last_hash
      FROM pq_migration_job_events e
     WHERE e.job_id = NEW.job_id AND e.chain_no IS NOT NULL
     ORDER BY e.chain_no DESC LIMIT 1;
    NEW.chain_no := COALESCE(last_no, 0) + 1;
    NEW.prev_hash := last_hash;
    NEW.hash := sha256(pqmig_event_canonical(NEW.chain_no, NEW.job_id, NEW.event, NEW.worker,
                                             NEW.detail, NEW.created_at, NEW.prev_hash));
    RETURN NEW;
END
$fn$;

DROP TRIGGER IF EXISTS trg_pq_mig_job_events_chain ON pq_migration_job_events;
CREATE TRIGGER trg_pq_mig_job_events_chain
    BEFORE INSERT ON pq_migration_job_events
    FOR EACH ROW EXECUTE FUNCTION pqmig_event_chain();
