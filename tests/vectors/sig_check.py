#!/usr/bin/env python3
"""Independent signatures for tests/signatures.rs, on pyca/cryptography
(OpenSSL): classical source signatures pqmig must accept, and checks of the
ML-DSA countersignatures pqmig made.

    sig_check.py make-sources   stdin: {"hashes": [b64...]}
                                stdout: Ed25519 and ECDSA P-256 keys and signatures
    sig_check.py verify-mldsa   stdin: [{"alg", "pk", "msg", "ctx", "sig"}...]
    sig_check.py mldsa-public   stdin: [{"alg", "seed"}...]; stdout: public keys from the seed
    sig_check.py make-mldsa-sources
                                stdin: {"alg", "items": [{"msg", "ctx"}...]}
                                stdout: {"pk", "sigs": [...]}: a fresh key's signatures

Bytes are base64. Exits non-zero on any failure.
"""

import base64
import json
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

b64d = base64.b64decode


def b64e(b):
    return base64.b64encode(b).decode()


MLDSA = {
    "ML-DSA-44": (mldsa.MLDSA44PrivateKey, mldsa.MLDSA44PublicKey),
    "ML-DSA-65": (mldsa.MLDSA65PrivateKey, mldsa.MLDSA65PublicKey),
    "ML-DSA-87": (mldsa.MLDSA87PrivateKey, mldsa.MLDSA87PublicKey),
}


def make_sources():
    req = json.load(sys.stdin)
    ed = ed25519.Ed25519PrivateKey.generate()
    p = ec.generate_private_key(ec.SECP256R1())
    out = {
        "ed25519_pk": b64e(ed.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)),
        "p256_pk": b64e(p.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)),
        "ed25519": [],
        "p256": [],
    }
    for h in req["hashes"]:
        msg = b64d(h)
        out["ed25519"].append(b64e(ed.sign(msg)))
        r, s = decode_dss_signature(p.sign(msg, ec.ECDSA(hashes.SHA256())))
        out["p256"].append(b64e(r.to_bytes(32, "big") + s.to_bytes(32, "big")))
    json.dump(out, sys.stdout)


def verify_mldsa():
    items = json.load(sys.stdin)
    for i, it in enumerate(items):
        pub = MLDSA[it["alg"]][1].from_public_bytes(b64d(it["pk"]))
        pub.verify(b64d(it["sig"]), b64d(it["msg"]), it["ctx"].encode())
    print(f"ok {len(items)} signatures")


def mldsa_public():
    items = json.load(sys.stdin)
    out = []
    for it in items:
        sk = MLDSA[it["alg"]][0].from_seed_bytes(b64d(it["seed"]))
        out.append(b64e(sk.public_key().public_bytes_raw()))
    json.dump(out, sys.stdout)


def make_mldsa_sources():
    req = json.load(sys.stdin)
    sk = MLDSA[req["alg"]][0].generate()
    out = {"pk": b64e(sk.public_key().public_bytes_raw()), "sigs": []}
    for it in req["items"]:
        out["sigs"].append(b64e(sk.sign(b64d(it["msg"]), it["ctx"].encode())))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    {
        "make-sources": make_sources,
        "verify-mldsa": verify_mldsa,
        "mldsa-public": mldsa_public,
        "make-mldsa-sources": make_mldsa_sources,
    }[sys.argv[1]]()
