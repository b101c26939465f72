-- V10: the `pkcs11` key provider (any HSM through its PKCS#11 module).
-- Additive and idempotent like V1-V9: kms_providers.provider may now also
-- name `pkcs11`; every value it allowed before is still allowed.
--
-- A CHECK cannot be widened in place. Every CHECK on kms_providers that
-- allows exactly the five providers of V2 (ck_kms_prov_provider, or a
-- host's own under another name, which V2 found and kept) is dropped, and
-- ck_kms_prov_provider added with `pkcs11`, NOT VALID like V2's: rows a
-- host wrote before are not re-checked, new ones are. Dropping and adding
-- take an ACCESS EXCLUSIVE lock on kms_providers for a moment, within
-- `pqmig migrate`'s lock_timeout (a timeout rolls the file back whole and
-- migrate tries again).
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT conname, pg_get_constraintdef(oid) AS def
        FROM pg_constraint
        WHERE conrelid = 'kms_providers'::regclass AND contype = 'c'
    LOOP
        IF c.def LIKE '%provider%'
           AND c.def LIKE '%''gcp''%' AND c.def LIKE '%''aws''%'
           AND c.def LIKE '%''azure''%' AND c.def LIKE '%''vault''%'
           AND c.def LIKE '%''local''%' AND c.def NOT LIKE '%''pkcs11''%'
        THEN
            EXECUTE format('ALTER TABLE kms_providers DROP CONSTRAINT %I', c.conname);
        END IF;
    END LOOP;
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'kms_providers'::regclass AND conname = 'ck_kms_prov_provider'
    ) THEN
        ALTER TABLE kms_providers ADD CONSTRAINT ck_kms_prov_provider
            CHECK (provider IN ('gcp', 'aws', 'azure', 'vault', 'local', 'pkcs11')) NOT VALID;
    END IF;
END
$$;
