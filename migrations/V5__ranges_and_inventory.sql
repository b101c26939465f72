-- V5: one job shared by every replica (its id ranges), and the exposure
-- inventory one replica samples for all. Additive and idempotent like
-- V1-V4; refinery runs it in one transaction. pqmig's own tables only.

-- The number of ranges a job was split into when it first started (NULL:
-- not split yet). A split job is worked range by range; its own row then
-- carries no lease, only the totals rolled up from its ranges.
ALTER TABLE pq_migration_jobs
    ADD COLUMN IF NOT EXISTS ranges INT;

-- One id range of a job: the items lo < id <= hi of its selection. Claimed,
-- leased, heartbeated, fenced and rescued like a job; every write is also
-- fenced on its job still being `running`, so a cancel stops every range.
CREATE TABLE IF NOT EXISTS pq_migration_ranges (
    job_id          BIGINT NOT NULL,
    range_no        INT NOT NULL,
    lo              BIGINT NOT NULL,
    hi              BIGINT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INT NOT NULL DEFAULT 0,
    not_before      TIMESTAMPTZ,
    locked_by       TEXT,
    lease_token     UUID,
    heartbeat_at    TIMESTAMPTZ,
    cursor          JSONB,
    processed_count BIGINT NOT NULL DEFAULT 0,
    failed_count    BIGINT NOT NULL DEFAULT 0,
    estimated_count BIGINT,
    -- Why its walker waits, while it does (database health, budget).
    throttled       TEXT,
    started_at      TIMESTAMPTZ,
    finished_at     TIMESTAMPTZ,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT pk_pq_mig_ranges PRIMARY KEY (job_id, range_no),
    CONSTRAINT ck_pq_mig_ranges_status CHECK (status IN ('pending', 'running', 'done')),
    CONSTRAINT ck_pq_mig_ranges_bounds CHECK (lo < hi),
    CONSTRAINT fk_pq_mig_ranges_job FOREIGN KEY (job_id)
        REFERENCES pq_migration_jobs (id) ON DELETE CASCADE
);

-- The range claim walks pending ranges in (job, range) order.
CREATE INDEX IF NOT EXISTS idx_pq_mig_ranges_pending
    ON pq_migration_ranges (job_id, range_no)
    WHERE status = 'pending';

-- The rescuer looks for running ranges whose heartbeat is older than the lease.
CREATE INDEX IF NOT EXISTS idx_pq_mig_ranges_heartbeat
    ON pq_migration_ranges (heartbeat_at)
    WHERE status = 'running';

-- A range that becomes pending (split, release, reclaim) wakes the replicas.
CREATE OR REPLACE FUNCTION pqmig_ranges_notify() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.status = 'pending'
       AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status) THEN
        PERFORM pg_notify('pqmig_jobs', NEW.job_id::text);
    END IF;
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS trg_pqmig_ranges_notify ON pq_migration_ranges;
CREATE TRIGGER trg_pqmig_ranges_notify
    AFTER INSERT OR UPDATE OF status ON pq_migration_ranges
    FOR EACH ROW EXECUTE FUNCTION pqmig_ranges_notify();

-- The exposure inventory as one replica last sampled it, for every replica's
-- gauges and `pqmig inventory`: one row per (pass, scope, algorithm, kind).
CREATE TABLE IF NOT EXISTS pq_migration_inventory (
    sampled_at TIMESTAMPTZ NOT NULL,
    scope      TEXT NOT NULL,
    algorithm  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    items      BIGINT NOT NULL,
    CONSTRAINT pk_pq_mig_inventory PRIMARY KEY (sampled_at, kind, scope, algorithm),
    CONSTRAINT ck_pq_mig_inventory_kind CHECK (kind IN ('vulnerable', 'protected'))
);
