-- V2: the host schema's neighbour tables that pqmig's scopes work on
-- (SPEC §3.2). Same rules as V1: additive and idempotent; on a table the host
-- already created, only missing named constraints are added (NOT VALID for
-- CHECK/FK) and host columns/rows are never touched.
--
-- Deliberately no extra secondary indexes on these host tables: a plain
-- CREATE INDEX (CONCURRENTLY is impossible inside refinery's transaction)
-- would block the host's writes to e.g. `signatures` for the whole build.
-- pqmig walks items by primary key (keyset), which the PKs already serve.
--
-- refinery runs this file in a single transaction.

-- ---------------------------------------------------------------------------
-- Session-local helpers, identical to V1's (each migration must stand alone:
-- it may run in a later session, or a later release, than V1).
-- ---------------------------------------------------------------------------

-- Adds CHECK or FOREIGN KEY constraint p_name (definition p_def) to p_table
-- unless it already exists. It is added NOT VALID: this path only runs for a
-- table the host created, whose existing rows we must neither scan under an
-- exclusive lock nor reject (a host row violating the enumeration would make
-- the whole migration fail). New and updated rows are still checked.
-- Host schemas often carry the same constraint under an auto-generated name
-- (e.g. pq_migration_jobs_status_check); when an equivalent one exists
-- (CHECK: same normalised definition; FK: same columns and referenced
-- columns) ours is dropped again, so no duplicate is left behind.
CREATE OR REPLACE FUNCTION pg_temp.pqmig_ensure_constraint(p_table regclass, p_name text, p_def text)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    ours pg_constraint%ROWTYPE;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = p_table AND conname = p_name) THEN
        RETURN;
    END IF;

    EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I %s NOT VALID', p_table, p_name, p_def);
    SELECT * INTO ours FROM pg_constraint WHERE conrelid = p_table AND conname = p_name;

    IF EXISTS (
        SELECT 1 FROM pg_constraint c
        WHERE c.conrelid = p_table
          AND c.oid <> ours.oid
          AND c.contype = ours.contype
          AND CASE ours.contype
                WHEN 'f' THEN c.conkey = ours.conkey
                          AND c.confrelid = ours.confrelid
                          AND c.confkey = ours.confkey
                ELSE regexp_replace(pg_get_constraintdef(c.oid), ' NOT VALID$', '')
                   = regexp_replace(pg_get_constraintdef(ours.oid), ' NOT VALID$', '')
              END
    ) THEN
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', p_table, p_name);
    END IF;
END
$fn$;

-- Adds UNIQUE constraint p_name on p_cols unless a constraint of that name or
-- any plain unique index (or primary key) on exactly that column set exists.
-- Checked before adding, since building a unique index scans the table.
CREATE OR REPLACE FUNCTION pg_temp.pqmig_ensure_unique(p_table regclass, p_name text, p_cols text[])
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = p_table AND conname = p_name) THEN
        RETURN;
    END IF;

    IF EXISTS (
        SELECT 1 FROM pg_index i
        WHERE i.indrelid = p_table
          AND i.indisunique
          AND i.indpred IS NULL
          AND i.indexprs IS NULL
          AND i.indnatts = cardinality(p_cols)
          AND (SELECT array_agg(k ORDER BY k) FROM unnest(i.indkey::int2[]) AS k)
            = (SELECT array_agg(a.attnum ORDER BY a.attnum)
                 FROM pg_attribute a
                WHERE a.attrelid = p_table AND a.attname = ANY (p_cols))
    ) THEN
        RETURN;
    END IF;

    EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I UNIQUE (%s)', p_table, p_name,
                   (SELECT string_agg(quote_ident(c), ', ') FROM unnest(p_cols) AS c));
END
$fn$;

-- ---------------------------------------------------------------------------
-- crypto_standard_aliases: alias -> algorithm (the CLI's --algo resolves
-- through it, case-insensitively; see V4 for the lower(alias) index).
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS crypto_standard_aliases (
    alias      VARCHAR(120) PRIMARY KEY,
    algo_id    BIGINT NOT NULL,
    notes      TEXT,
    created_at TIMESTAMPTZ(6) NOT NULL DEFAULT now(),
    CONSTRAINT fk_csa_algo FOREIGN KEY (algo_id)
        REFERENCES crypto_algorithms (id) ON DELETE CASCADE
);

SELECT pg_temp.pqmig_ensure_constraint('crypto_standard_aliases', 'fk_csa_algo',
       'FOREIGN KEY (algo_id) REFERENCES crypto_algorithms (id) ON DELETE CASCADE');

-- ---------------------------------------------------------------------------
-- policy_algorithms: which algorithms a policy uses, per role
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS policy_algorithms (
    policy_id BIGINT NOT NULL,
    algo_id   BIGINT NOT NULL,
    role      TEXT NOT NULL,
    weight    INT NOT NULL DEFAULT 1,
    priority  INT NOT NULL DEFAULT 0,
    PRIMARY KEY (policy_id, algo_id, role),
    CONSTRAINT ck_pa_role CHECK (role IN ('kem', 'sig', 'hash', 'symmetric')),
    CONSTRAINT fk_pa_policy FOREIGN KEY (policy_id)
        REFERENCES encryption_policies (id) ON DELETE CASCADE,
    CONSTRAINT fk_pa_algo FOREIGN KEY (algo_id)
        REFERENCES crypto_algorithms (id) ON DELETE CASCADE
);

SELECT pg_temp.pqmig_ensure_constraint('policy_algorithms', 'ck_pa_role',
       $$CHECK (role IN ('kem', 'sig', 'hash', 'symmetric'))$$);
SELECT pg_temp.pqmig_ensure_constraint('policy_algorithms', 'fk_pa_policy',
       'FOREIGN KEY (policy_id) REFERENCES encryption_policies (id) ON DELETE CASCADE');
SELECT pg_temp.pqmig_ensure_constraint('policy_algorithms', 'fk_pa_algo',
       'FOREIGN KEY (algo_id) REFERENCES crypto_algorithms (id) ON DELETE CASCADE');

-- ---------------------------------------------------------------------------
-- kms_providers
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS kms_providers (
    id             BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name           VARCHAR(120) NOT NULL,
    provider       TEXT NOT NULL,
    location       VARCHAR(120),
    project_tenant VARCHAR(255),
    created_at     TIMESTAMPTZ(6) NOT NULL DEFAULT now(),
    is_enabled     BOOLEAN NOT NULL DEFAULT TRUE,
    CONSTRAINT ck_kms_prov_provider CHECK (provider IN ('gcp', 'aws', 'azure', 'vault', 'local'))
);

SELECT pg_temp.pqmig_ensure_constraint('kms_providers', 'ck_kms_prov_provider',
       $$CHECK (provider IN ('gcp', 'aws', 'azure', 'vault', 'local'))$$);

-- ---------------------------------------------------------------------------
-- kms_keys: keys are named by external_key_ref, never stored (SPEC §4)
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS kms_keys (
    id               BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    provider_id      BIGINT NOT NULL,
    external_key_ref VARCHAR(512) NOT NULL,
    purpose          TEXT NOT NULL DEFAULT 'wrap',
    algorithm        VARCHAR(64),
    status           TEXT NOT NULL DEFAULT 'active',
    created_at       TIMESTAMPTZ(6) NOT NULL DEFAULT now(),
    CONSTRAINT ck_kms_keys_purpose CHECK (purpose IN ('wrap', 'encrypt', 'both')),
    CONSTRAINT ck_kms_keys_status  CHECK (status IN ('active', 'retired', 'disabled')),
    -- No cascade: deleting a provider must not silently orphan wrapped data.
    CONSTRAINT fk_kms_keys_provider FOREIGN KEY (provider_id) REFERENCES kms_providers (id)
);

SELECT pg_temp.pqmig_ensure_constraint('kms_keys', 'ck_kms_keys_purpose',
       $$CHECK (purpose IN ('wrap', 'encrypt', 'both'))$$);
SELECT pg_temp.pqmig_ensure_constraint('kms_keys', 'ck_kms_keys_status',
       $$CHECK (status IN ('active', 'retired', 'disabled'))$$);
SELECT pg_temp.pqmig_ensure_constraint('kms_keys', 'fk_kms_keys_provider',
       'FOREIGN KEY (provider_id) REFERENCES kms_providers (id)');

-- ---------------------------------------------------------------------------
-- policy_kms_keys: the keys a policy may wrap with
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS policy_kms_keys (
    policy_id  BIGINT NOT NULL,
    kms_key_id BIGINT NOT NULL,
    weight     INT NOT NULL DEFAULT 1,
    priority   INT NOT NULL DEFAULT 0,
    PRIMARY KEY (policy_id, kms_key_id),
    CONSTRAINT fk_pkk_policy FOREIGN KEY (policy_id)
        REFERENCES encryption_policies (id) ON DELETE CASCADE,
    CONSTRAINT fk_pkk_kms_key FOREIGN KEY (kms_key_id)
        REFERENCES kms_keys (id) ON DELETE CASCADE
);

SELECT pg_temp.pqmig_ensure_constraint('policy_kms_keys', 'fk_pkk_policy',
       'FOREIGN KEY (policy_id) REFERENCES encryption_policies (id) ON DELETE CASCADE');
SELECT pg_temp.pqmig_ensure_constraint('policy_kms_keys', 'fk_pkk_kms_key',
       'FOREIGN KEY (kms_key_id) REFERENCES kms_keys (id) ON DELETE CASCADE');

-- ---------------------------------------------------------------------------
-- key_wrappers: one wrapped DEK per row (formats: SPEC §5.1, §5.2).
-- crypto_suite NULL means legacy-aes-gcm; dek_wrap2 is '' for pqmig-wrap-v1.
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS key_wrappers (
    id           BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    wrapper_uuid CHAR(36) NOT NULL,
    kms1_key_id  BIGINT,
    kms2_key_id  BIGINT,
    dek_wrap1    BYTEA,
    dek_wrap2    BYTEA,
    crypto_suite JSONB,
    wrap_version INT NOT NULL DEFAULT 1,
    status       TEXT NOT NULL DEFAULT 'active',
    created_at   TIMESTAMPTZ(6) NOT NULL DEFAULT now(),
    rotated_at   TIMESTAMPTZ(6),
    CONSTRAINT uq_key_wrappers_uuid UNIQUE (wrapper_uuid),
    CONSTRAINT ck_key_wrappers_status CHECK (status IN ('active', 'rotated', 'retired', 'invalid')),
    CONSTRAINT fk_kw_kms1 FOREIGN KEY (kms1_key_id) REFERENCES kms_keys (id),
    CONSTRAINT fk_kw_kms2 FOREIGN KEY (kms2_key_id) REFERENCES kms_keys (id)
);

SELECT pg_temp.pqmig_ensure_unique('key_wrappers', 'uq_key_wrappers_uuid', ARRAY['wrapper_uuid']);
SELECT pg_temp.pqmig_ensure_constraint('key_wrappers', 'ck_key_wrappers_status',
       $$CHECK (status IN ('active', 'rotated', 'retired', 'invalid'))$$);
SELECT pg_temp.pqmig_ensure_constraint('key_wrappers', 'fk_kw_kms1',
       'FOREIGN KEY (kms1_key_id) REFERENCES kms_keys (id)');
SELECT pg_temp.pqmig_ensure_constraint('key_wrappers', 'fk_kw_kms2',
       'FOREIGN KEY (kms2_key_id) REFERENCES kms_keys (id)');

-- ---------------------------------------------------------------------------
-- key_wrapper_layers: the KEM layers of a pqmig-wrap-v1 wrapper (SPEC §5.2)
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS key_wrapper_layers (
    id             BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    key_wrapper_id BIGINT NOT NULL,
    layer_no       SMALLINT NOT NULL,
    kms_key_id     BIGINT,
    kem_algo_id    BIGINT,
    kem_ciphertext BYTEA,
    encap_pubkey   BYTEA,
    aad            JSONB,
    meta           JSONB,
    created_at     TIMESTAMPTZ(6) NOT NULL DEFAULT now(),
    CONSTRAINT uq_kwl_wrapper_layer UNIQUE (key_wrapper_id, layer_no),
    CONSTRAINT fk_kwl_wrapper FOREIGN KEY (key_wrapper_id)
        REFERENCES key_wrappers (id) ON DELETE CASCADE,
    CONSTRAINT fk_kwl_kms_key FOREIGN KEY (kms_key_id) REFERENCES kms_keys (id),
    CONSTRAINT fk_kwl_algo FOREIGN KEY (kem_algo_id) REFERENCES crypto_algorithms (id)
);

SELECT pg_temp.pqmig_ensure_unique('key_wrapper_layers', 'uq_kwl_wrapper_layer',
       ARRAY['key_wrapper_id', 'layer_no']);
SELECT pg_temp.pqmig_ensure_constraint('key_wrapper_layers', 'fk_kwl_wrapper',
       'FOREIGN KEY (key_wrapper_id) REFERENCES key_wrappers (id) ON DELETE CASCADE');
SELECT pg_temp.pqmig_ensure_constraint('key_wrapper_layers', 'fk_kwl_kms_key',
       'FOREIGN KEY (kms_key_id) REFERENCES kms_keys (id)');
SELECT pg_temp.pqmig_ensure_constraint('key_wrapper_layers', 'fk_kwl_algo',
       'FOREIGN KEY (kem_algo_id) REFERENCES crypto_algorithms (id)');

-- ---------------------------------------------------------------------------
-- signing_keys: private_key_enc = nonce || AES-256-GCM(KEK of kms_key_id, ...)
-- (SPEC §4); NULL when the key lives in a KMS.
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS signing_keys (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    algo_id         BIGINT NOT NULL,
    name            VARCHAR(120) NOT NULL,
    public_key      BYTEA NOT NULL,
    private_key_enc BYTEA,
    kms_key_id      BIGINT,
    origin          TEXT NOT NULL DEFAULT 'local',
    status          TEXT NOT NULL DEFAULT 'active',
    scope           VARCHAR(120),
    created_by      BIGINT,
    created_at      TIMESTAMPTZ(6) NOT NULL DEFAULT now(),
    activated_at    TIMESTAMPTZ(6),
    retired_at      TIMESTAMPTZ(6),
    notes           TEXT,
    CONSTRAINT uq_signing_keys_name UNIQUE (name),
    CONSTRAINT ck_signing_keys_origin CHECK (origin IN ('local', 'kms', 'imported')),
    CONSTRAINT ck_signing_keys_status CHECK (status IN ('active', 'retired', 'compromised')),
    CONSTRAINT fk_sk_algo FOREIGN KEY (algo_id) REFERENCES crypto_algorithms (id),
    CONSTRAINT fk_sk_kms_key FOREIGN KEY (kms_key_id) REFERENCES kms_keys (id),
    CONSTRAINT fk_sk_created_by FOREIGN KEY (created_by)
        REFERENCES users (id) ON DELETE SET NULL
);

SELECT pg_temp.pqmig_ensure_unique('signing_keys', 'uq_signing_keys_name', ARRAY['name']);
SELECT pg_temp.pqmig_ensure_constraint('signing_keys', 'ck_signing_keys_origin',
       $$CHECK (origin IN ('local', 'kms', 'imported'))$$);
SELECT pg_temp.pqmig_ensure_constraint('signing_keys', 'ck_signing_keys_status',
       $$CHECK (status IN ('active', 'retired', 'compromised'))$$);
SELECT pg_temp.pqmig_ensure_constraint('signing_keys', 'fk_sk_algo',
       'FOREIGN KEY (algo_id) REFERENCES crypto_algorithms (id)');
SELECT pg_temp.pqmig_ensure_constraint('signing_keys', 'fk_sk_kms_key',
       'FOREIGN KEY (kms_key_id) REFERENCES kms_keys (id)');
SELECT pg_temp.pqmig_ensure_constraint('signing_keys', 'fk_sk_created_by',
       'FOREIGN KEY (created_by) REFERENCES users (id) ON DELETE SET NULL');

-- ---------------------------------------------------------------------------
-- signatures: one per (subject, context, algorithm). context is NOT NULL
-- (default '') so that the UNIQUE really holds -- NULLs never conflict -- and
-- the signatures scope's INSERT ... ON CONFLICT DO NOTHING stays idempotent.
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS signatures (
    id             BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    subject_table  VARCHAR(64) NOT NULL,
    subject_pk     VARCHAR(64) NOT NULL,
    context        VARCHAR(64) NOT NULL DEFAULT '',
    algo_id        BIGINT NOT NULL,
    signing_key_id BIGINT,
    signature      BYTEA NOT NULL,
    payload_hash   BYTEA NOT NULL,
    hash_algo_id   BIGINT,
    created_at     TIMESTAMPTZ(6) NOT NULL DEFAULT now(),
    CONSTRAINT uq_signatures_subject UNIQUE (subject_table, subject_pk, context, algo_id),
    CONSTRAINT fk_sig_algo FOREIGN KEY (algo_id) REFERENCES crypto_algorithms (id),
    CONSTRAINT fk_sig_signing_key FOREIGN KEY (signing_key_id) REFERENCES signing_keys (id),
    CONSTRAINT fk_sig_hash_algo FOREIGN KEY (hash_algo_id) REFERENCES crypto_algorithms (id)
);

SELECT pg_temp.pqmig_ensure_unique('signatures', 'uq_signatures_subject',
       ARRAY['subject_table', 'subject_pk', 'context', 'algo_id']);
SELECT pg_temp.pqmig_ensure_constraint('signatures', 'fk_sig_algo',
       'FOREIGN KEY (algo_id) REFERENCES crypto_algorithms (id)');
SELECT pg_temp.pqmig_ensure_constraint('signatures', 'fk_sig_signing_key',
       'FOREIGN KEY (signing_key_id) REFERENCES signing_keys (id)');
SELECT pg_temp.pqmig_ensure_constraint('signatures', 'fk_sig_hash_algo',
       'FOREIGN KEY (hash_algo_id) REFERENCES crypto_algorithms (id)');

-- ---------------------------------------------------------------------------
-- hash_profiles: params.key_ref names the pepper key (SPEC §5.4)
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS hash_profiles (
    id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name       VARCHAR(120) NOT NULL,
    algo_id    BIGINT NOT NULL,
    output_len SMALLINT,
    params     JSONB NOT NULL DEFAULT '{}',
    status     TEXT NOT NULL DEFAULT 'active',
    created_at TIMESTAMPTZ(6) NOT NULL DEFAULT now(),
    CONSTRAINT uq_hash_profiles_name UNIQUE (name),
    CONSTRAINT ck_hash_profiles_status CHECK (status IN ('active', 'deprecated')),
    CONSTRAINT ck_hash_profiles_output_len CHECK (output_len IS NULL OR output_len > 0),
    CONSTRAINT fk_hp_algo FOREIGN KEY (algo_id) REFERENCES crypto_algorithms (id)
);

SELECT pg_temp.pqmig_ensure_unique('hash_profiles', 'uq_hash_profiles_name', ARRAY['name']);
SELECT pg_temp.pqmig_ensure_constraint('hash_profiles', 'ck_hash_profiles_status',
       $$CHECK (status IN ('active', 'deprecated'))$$);
SELECT pg_temp.pqmig_ensure_constraint('hash_profiles', 'ck_hash_profiles_output_len',
       'CHECK (output_len IS NULL OR output_len > 0)');
SELECT pg_temp.pqmig_ensure_constraint('hash_profiles', 'fk_hp_algo',
       'FOREIGN KEY (algo_id) REFERENCES crypto_algorithms (id)');

-- ---------------------------------------------------------------------------
-- field_hash_policies: which profile hashes (entity_table, field_name) since
-- when; the hashes scope only accepts pairs registered here.
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS field_hash_policies (
    id             BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    entity_table   VARCHAR(64) NOT NULL,
    field_name     VARCHAR(64) NOT NULL,
    profile_id     BIGINT NOT NULL,
    effective_from TIMESTAMPTZ(6) NOT NULL DEFAULT now(),
    notes          TEXT,
    CONSTRAINT uq_fhp_entity_field_from UNIQUE (entity_table, field_name, effective_from),
    CONSTRAINT fk_fhp_profile FOREIGN KEY (profile_id) REFERENCES hash_profiles (id)
);

SELECT pg_temp.pqmig_ensure_unique('field_hash_policies', 'uq_fhp_entity_field_from',
       ARRAY['entity_table', 'field_name', 'effective_from']);
SELECT pg_temp.pqmig_ensure_constraint('field_hash_policies', 'fk_fhp_profile',
       'FOREIGN KEY (profile_id) REFERENCES hash_profiles (id)');

DROP FUNCTION pg_temp.pqmig_ensure_constraint(regclass, text, text);
DROP FUNCTION pg_temp.pqmig_ensure_unique(regclass, text, text[]);
