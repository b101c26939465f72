-- V8: retrying a job's failed items (`pqmig resume JOB --retry-failed`).
-- Additive and idempotent like V1-V7; pqmig's own tables only.

-- A retry range walks only these ids of lo < id <= hi (NULL: every id of
-- its selection in the range). `resume --retry-failed` adds such ranges
-- after a job's own, one per 100000 failed ids, takes those items'
-- failures off the ranges that counted them and deletes their
-- pq_migration_item_errors rows: an item that fails again is counted and
-- recorded by its retry range.
ALTER TABLE pq_migration_ranges
    ADD COLUMN IF NOT EXISTS only_ids BIGINT[];
