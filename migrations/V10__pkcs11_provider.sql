-- V10: the `pkcs11` key provider (any HSM through its PKCS#11 module).
-- Additive and idempotent like V1-V9: kms_providers.provider may now also
-- name `pkcs11`; every value it allowed before is still allowed.
--
-- A CHECK cannot be widened in place: the constraint is dropped and added
-- again, NOT VALID, then validated (kms_providers is a handful of rows;
-- validation takes only a SHARE UPDATE EXCLUSIVE lock).
ALTER TABLE kms_providers DROP CONSTRAINT IF EXISTS ck_kms_prov_provider;
ALTER TABLE kms_providers ADD CONSTRAINT ck_kms_prov_provider
    CHECK (provider IN ('gcp', 'aws', 'azure', 'vault', 'local', 'pkcs11')) NOT VALID;
ALTER TABLE kms_providers VALIDATE CONSTRAINT ck_kms_prov_provider;
