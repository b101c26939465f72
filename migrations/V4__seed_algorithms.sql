-- V4: seed crypto_algorithms and crypto_standard_aliases (SPEC §3.3).
-- Insert-if-missing only: rows the host already has (e.g. its own ML-KEM 768)
-- are matched on (class, name, variant_norm) and left exactly as they are,
-- params included. Hosts may add more algorithms and aliases.
-- refinery runs this file in one transaction.

-- params.pq: true when the algorithm is considered quantum-safe.
-- Keyed hashes: HMAC with a 256-bit (or longer) secret key is considered
-- quantum-safe -- Grover's algorithm at best halves the effective key
-- strength, leaving ~128 bits -- so the HMAC variants are {"pq": true}.
-- Plain hashes are {"pq": false, "keyed": false}: over guessable inputs
-- (e-mail addresses, IPs) an unkeyed hash is reversed by enumeration, quantum
-- computer or not, so they are never a target of the hashes scope.
INSERT INTO crypto_algorithms (class, name, variant, nist_level, params)
SELECT v.class, v.name, v.variant, v.nist_level, v.params::jsonb
FROM (VALUES
    ('kem',       'ML-KEM',   '512',        1,    '{"pq": true}'),
    ('kem',       'ML-KEM',   '768',        3,    '{"pq": true}'),
    ('kem',       'ML-KEM',   '1024',       5,    '{"pq": true}'),
    ('kem',       'X-Wing',   NULL,         3,    '{"pq": true, "hybrid": ["X25519", "ML-KEM-768"]}'),
    ('kem',       'X25519',   NULL,         NULL, '{"pq": false}'),
    ('sig',       'ML-DSA',   '44',         2,    '{"pq": true}'),
    ('sig',       'ML-DSA',   '65',         3,    '{"pq": true}'),
    ('sig',       'ML-DSA',   '87',         5,    '{"pq": true}'),
    ('sig',       'SLH-DSA',  'SHA2-128s',  1,    '{"pq": true}'),
    ('sig',       'SLH-DSA',  'SHA2-128f',  1,    '{"pq": true}'),
    ('sig',       'Ed25519',  NULL,         NULL, '{"pq": false}'),
    ('sig',       'ECDSA',    'P-256',      NULL, '{"pq": false}'),
    ('hash',      'SHA-256',  NULL,         NULL, '{"pq": false, "keyed": false}'),
    ('hash',      'SHA-384',  NULL,         NULL, '{"pq": false, "keyed": false}'),
    ('hash',      'SHA-512',  NULL,         NULL, '{"pq": false, "keyed": false}'),
    ('hash',      'SHA3-256', NULL,         NULL, '{"pq": false, "keyed": false}'),
    ('hash',      'SHA3-512', NULL,         NULL, '{"pq": false, "keyed": false}'),
    ('hash',      'HMAC',     'SHA-256',    NULL, '{"pq": true, "keyed": true}'),
    ('hash',      'HMAC',     'SHA-512',    NULL, '{"pq": true, "keyed": true}'),
    ('hash',      'HMAC',     'SHA3-256',   NULL, '{"pq": true, "keyed": true}'),
    ('hash',      'HMAC',     'SHA3-512',   NULL, '{"pq": true, "keyed": true}'),
    ('symmetric', 'AES-GCM',  '256',        NULL, '{"pq": true}')
) AS v (class, name, variant, nist_level, params)
-- The NOT EXISTS keeps re-runs from drawing (and wasting) identity values;
-- ON CONFLICT still covers a concurrent insert by the host.
WHERE NOT EXISTS (
    SELECT 1 FROM crypto_algorithms a
    WHERE a.class = v.class AND a.name = v.name AND a.variant_norm = COALESCE(v.variant, '')
)
ON CONFLICT (class, name, variant_norm) DO NOTHING;

-- Exactly one alias per seeded algorithm. The algorithm id is resolved by its
-- natural key, so it is the host's row where the host had one. An alias is
-- skipped when the host already has it in any letter case: the application
-- matches aliases case-insensitively, and a second spelling would make that
-- lookup ambiguous.
INSERT INTO crypto_standard_aliases (alias, algo_id, notes)
SELECT v.alias, a.id, 'seeded by pqmig'
FROM (VALUES
    ('ML-KEM-512',        'kem',       'ML-KEM',   '512'),
    ('ML-KEM-768',        'kem',       'ML-KEM',   '768'),
    ('ML-KEM-1024',       'kem',       'ML-KEM',   '1024'),
    ('X-Wing',            'kem',       'X-Wing',   NULL),
    ('X25519',            'kem',       'X25519',   NULL),
    ('ML-DSA-44',         'sig',       'ML-DSA',   '44'),
    ('ML-DSA-65',         'sig',       'ML-DSA',   '65'),
    ('ML-DSA-87',         'sig',       'ML-DSA',   '87'),
    ('SLH-DSA-SHA2-128s', 'sig',       'SLH-DSA',  'SHA2-128s'),
    ('SLH-DSA-SHA2-128f', 'sig',       'SLH-DSA',  'SHA2-128f'),
    ('Ed25519',           'sig',       'Ed25519',  NULL),
    ('ECDSA-P256',        'sig',       'ECDSA',    'P-256'),
    ('SHA-256',           'hash',      'SHA-256',  NULL),
    ('SHA-384',           'hash',      'SHA-384',  NULL),
    ('SHA-512',           'hash',      'SHA-512',  NULL),
    ('SHA3-256',          'hash',      'SHA3-256', NULL),
    ('SHA3-512',          'hash',      'SHA3-512', NULL),
    ('HMAC-SHA-256',      'hash',      'HMAC',     'SHA-256'),
    ('HMAC-SHA-512',      'hash',      'HMAC',     'SHA-512'),
    ('HMAC-SHA3-256',     'hash',      'HMAC',     'SHA3-256'),
    ('HMAC-SHA3-512',     'hash',      'HMAC',     'SHA3-512'),
    ('AES-256-GCM',       'symmetric', 'AES-GCM',  '256')
) AS v (alias, class, name, variant)
JOIN crypto_algorithms a
  ON a.class = v.class
 AND a.name = v.name
 AND a.variant_norm = COALESCE(v.variant, '')
WHERE NOT EXISTS (
    SELECT 1 FROM crypto_standard_aliases x WHERE lower(x.alias) = lower(v.alias)
)
ON CONFLICT (alias) DO NOTHING;

-- Serves the application's case-insensitive lookup
-- (WHERE lower(alias) = lower($1)). Deliberately NOT unique: a host table
-- that already holds two spellings of one alias would make a unique index
-- fail the migration, and would reject such host inserts afterwards.
CREATE INDEX IF NOT EXISTS idx_crypto_aliases_lower_alias
    ON crypto_standard_aliases (lower(alias));
