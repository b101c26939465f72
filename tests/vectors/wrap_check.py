#!/usr/bin/env python3
"""Independent implementation of the wrapper formats of SPEC §5.1 and §5.2
on pyca/cryptography (OpenSSL's ML-KEM, AES-GCM, HKDF, X25519; X-Wing from
ML-KEM-768, X25519 and hashlib's SHAKE-256 and SHA3-256), used by
tests/wrappers.rs to cross-check pqmig.

    wrap_check.py check-vectors FILE   re-derive every committed vector
    wrap_check.py open-v1              stdin: wrappers pqmig wrote; open them
    wrap_check.py make-legacy          stdin: keys, uuids, DEKs; stdout: wraps

Everything is JSON; bytes are base64. Exits non-zero on any mismatch.
"""

import base64
import hashlib
import json
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

b64d = base64.b64decode


def b64e(b):
    return base64.b64encode(b).decode()


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def mlkem_key(alg, seed):
    cls = {"ML-KEM-768": mlkem.MLKEM768PrivateKey, "ML-KEM-1024": mlkem.MLKEM1024PrivateKey}[alg]
    return cls.from_seed_bytes(seed)


XWING_LABEL = b"\\.//^\\"


def xwing_decapsulate(seed, ct):
    """X-Wing (draft-connolly-cfrg-xwing-kem): the 32-byte seed expanded by
    SHAKE-256 into ML-KEM-768's d || z and an X25519 secret; the two shared
    secrets combined with SHA3-256."""
    expanded = hashlib.shake_256(seed).digest(96)
    sk_m = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
    sk_x = x25519.X25519PrivateKey.from_private_bytes(expanded[64:96])
    ct_m, ct_x = ct[:1088], ct[1088:]
    ss_m = sk_m.decapsulate(ct_m)
    ss_x = sk_x.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
    pk_x = raw_pub(sk_x.public_key())
    return hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + XWING_LABEL).digest()


def decapsulate(alg, seed, ct):
    if alg == "X-Wing":
        return xwing_decapsulate(seed, ct)
    return mlkem_key(alg, seed).decapsulate(ct)


def v1_kek(uuid, shared, cts, aad):
    transcript = hashlib.sha384(b"".join(cts)).digest()
    okm = HKDF(
        algorithm=hashes.SHA384(),
        length=64,
        salt=uuid.encode(),
        info=b"pqmig-wrap-v1\x00" + transcript + aad,
    ).derive(b"".join(shared))
    return okm[:32], okm[32:]


def open_v1(w):
    """Decapsulate every layer, derive, check the commitment, open."""
    aad = canonical(w["aad"])
    cts = [b64d(l["ct"]) for l in w["layers"]]
    shared = [decapsulate(l["alg"], b64d(l["seed"]), ct) for l, ct in zip(w["layers"], cts)]
    kek, kc = v1_kek(w["uuid"], shared, cts, aad)
    if kc != b64d(w["kc"]):
        raise AssertionError(f"{w['uuid']}: key commitment differs")
    wrap = b64d(w["wrap"])
    return AESGCM(kek).decrypt(wrap[:12], wrap[12:], aad), kek


def legacy_x25519_key(eph_pub, recipient_pub, dh):
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient_pub, info=b"pqmig-legacy-x25519"
    ).derive(dh)


def raw_pub(pk):
    return pk.public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_vectors(path):
    doc = json.load(open(path))
    n = 0
    for v in doc["legacy_aes_gcm"]:
        want = b64d(v["nonce"]) + AESGCM(b64d(v["kek"])).encrypt(b64d(v["nonce"]), b64d(v["dek"]), v["uuid"].encode())
        assert want == b64d(v["wrap"]), f"legacy-aes-gcm {v['uuid']}"
        n += 1
    for v in doc["legacy_x25519"]:
        recipient = x25519.X25519PrivateKey.from_private_bytes(b64d(v["recipient_secret"]))
        eph = x25519.X25519PrivateKey.from_private_bytes(b64d(v["eph_secret"]))
        eph_pub = raw_pub(eph.public_key())
        k = legacy_x25519_key(eph_pub, raw_pub(recipient.public_key()), eph.exchange(recipient.public_key()))
        want = eph_pub + b64d(v["nonce"]) + AESGCM(k).encrypt(b64d(v["nonce"]), b64d(v["dek"]), v["uuid"].encode())
        assert want == b64d(v["wrap"]), f"legacy-x25519 {v['uuid']}"
        # and the recipient side opens it
        wrap = b64d(v["wrap"])
        k2 = legacy_x25519_key(wrap[:32], raw_pub(recipient.public_key()), recipient.exchange(x25519.X25519PublicKey.from_public_bytes(wrap[:32])))
        assert AESGCM(k2).decrypt(wrap[32:44], wrap[44:], v["uuid"].encode()) == b64d(v["dek"])
        n += 1
    for v in doc["pqmig_wrap_v1"]:
        for l in v["layers"]:
            pk = mlkem_key(l["alg"], b64d(l["seed"])).public_key().public_bytes_raw()
            assert pk == b64d(l["public_key"]), f"v1 {v['uuid']}: public key from seed"
        dek, kek = open_v1(v)
        assert dek == b64d(v["dek"]), f"v1 {v['uuid']}: DEK"
        # the wrap itself is deterministic given KEK and nonce
        aad = canonical(v["aad"])
        nonce = b64d(v["wrap"])[:12]
        assert nonce + AESGCM(kek).encrypt(nonce, dek, aad) == b64d(v["wrap"]), f"v1 {v['uuid']}: wrap bytes"
        assert aad == v["aad_bytes"].encode(), f"v1 {v['uuid']}: canonical AAD"
        n += 1
    print(f"ok {n} vectors")


def open_v1_stdin():
    items = json.load(sys.stdin)
    for w in items:
        dek, _ = open_v1(w)
        assert dek == b64d(w["dek"]), f"{w['uuid']}: DEK differs"
    print(f"ok {len(items)} wrappers")


def make_legacy():
    req = json.load(sys.stdin)
    kek = AESGCM(b64d(req["aes_key"]))
    recipient_pub = x25519.X25519PrivateKey.from_private_bytes(b64d(req["x25519_secret"])).public_key()
    out = []
    import os

    for uuid, dek in zip(req["uuids"], req["deks"]):
        dek = b64d(dek)
        nonce = os.urandom(12)
        aes = nonce + kek.encrypt(nonce, dek, uuid.encode())
        eph = x25519.X25519PrivateKey.generate()
        eph_pub = raw_pub(eph.public_key())
        k = legacy_x25519_key(eph_pub, raw_pub(recipient_pub), eph.exchange(recipient_pub))
        nonce = os.urandom(12)
        x = eph_pub + nonce + AESGCM(k).encrypt(nonce, dek, uuid.encode())
        out.append({"uuid": uuid, "aes": b64e(aes), "x25519": b64e(x)})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "check-vectors":
        check_vectors(sys.argv[2])
    elif cmd == "open-v1":
        open_v1_stdin()
    elif cmd == "make-legacy":
        make_legacy()
    else:
        sys.exit(f"unknown command {cmd}")
