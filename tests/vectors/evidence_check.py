#!/usr/bin/env python3
"""Independent checks of pqmig's evidence for tests/evidence.rs, written
from the published formats and not from pqmig's code.

    evidence_check.py dsse    stdin: {"envelope": {...}, "keys": {"<keyid>": {"alg", "pk"}},
                                      "leaves": [{"id", "fields": [b64 | "text:" | "json:" JSON]}...],
                                      "leaves_file": b64 (optional)}
        Verifies every DSSE signature over PAE(payloadType, payload) with
        pyca/cryptography (ML-DSA-65, Ed25519; keyid = "sha256:" + hex of
        SHA-256(public key)), then rebuilds the RFC 9162 Merkle root from the
        items' stored values (value hash = SHA-256 of each field as 4-byte
        big-endian length || bytes; leaf = id as 8-byte big-endian || value
        hash) and compares it with the predicate's root; with "leaves_file"
        (base64 of the .leaves file) also checks that the subject digest is
        its SHA-256.
        stdout: {"signed_by": [alg...], "root": hex}
    evidence_check.py proof   stdin: a `pqmig attest prove` JSON proof
        Checks the inclusion path (RFC 9162 §2.1.3.2).
    evidence_check.py cbom    stdin: a CycloneDX document
        Validates it with cyclonedx-python-lib's strict JSON validator for
        CycloneDX 1.6; stdout: "valid", or the errors and exit 1.

Bytes are base64 unless said hex. Exits non-zero on any failure.
"""

import base64
import hashlib
import json
import sys

b64d = base64.b64decode


def pae(payload_type, body):
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def value_hash(fields):
    h = hashlib.sha256()
    for f in fields:
        h.update(len(f).to_bytes(4, "big"))
        h.update(f)
    return h.digest()


def leaf_hash(leaf):
    return hashlib.sha256(b"\x00" + leaf).digest()


def node(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def root(hashes):
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return node(root(hashes[:k]), root(hashes[k:]))


def verify_sig(alg, pk, sig, data):
    if alg == "ML-DSA-65":
        from cryptography.hazmat.primitives.asymmetric import mldsa

        mldsa.MLDSA65PublicKey.from_public_bytes(pk).verify(sig, data)
    elif alg == "Ed25519":
        from cryptography.hazmat.primitives.asymmetric import ed25519

        ed25519.Ed25519PublicKey.from_public_bytes(pk).verify(sig, data)
    else:
        raise SystemExit(f"unknown algorithm {alg}")


def field(f):
    """A leaf field: base64 bytes, "text:" and UTF-8 text, or "json:" and
    a JSON value, taken in its canonical form (keys sorted at every depth,
    no whitespace)."""
    if f.startswith("text:"):
        return f[5:].encode()
    if f.startswith("json:"):
        value = json.loads(f[5:])
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return b64d(f)


def dsse(doc):
    env = doc["envelope"]
    body = b64d(env["payload"])
    signed = pae(env["payloadType"], body)
    signed_by = []
    for s in env["signatures"]:
        key = doc["keys"][s["keyid"]]
        pk = b64d(key["pk"])
        want = "sha256:" + hashlib.sha256(pk).hexdigest()
        if want != s["keyid"]:
            raise SystemExit(f"keyid {s['keyid']} is not {want}")
        verify_sig(key["alg"], pk, b64d(s["sig"]), signed)
        signed_by.append(key["alg"])
    statement = json.loads(body)
    assert statement["_type"] == "https://in-toto.io/Statement/v1", statement["_type"]
    if "leaves_file" in doc:
        digest = hashlib.sha256(b64d(doc["leaves_file"])).hexdigest()
        subject = statement["subject"][0]["digest"]["sha256"]
        if digest != subject:
            raise SystemExit(f"the leaves file's SHA-256 {digest} is not the subject's {subject}")
    leaves = sorted(
        (item["id"], value_hash([field(f) for f in item["fields"]])) for item in doc["leaves"]
    )
    hashes = [leaf_hash(i.to_bytes(8, "big", signed=True) + v) for i, v in leaves]
    got = root(hashes).hex()
    want = statement["predicate"]["items"]["root"]
    if got != want:
        raise SystemExit(f"Merkle root {got} is not the attested {want}")
    print(json.dumps({"signed_by": signed_by, "root": got}))


def proof(p):
    index, size = p["leaf_index"], p["tree_size"]
    r = leaf_hash(bytes.fromhex(p["leaf"]))
    fn, sn = index, size - 1
    for h in p["path"]:
        h = bytes.fromhex(h)
        if sn == 0:
            raise SystemExit("path too long")
        if fn & 1 or fn == sn:
            r = node(h, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node(r, h)
        fn >>= 1
        sn >>= 1
    if sn != 0 or r.hex() != p["root"]:
        raise SystemExit("the proof does not lead to the root")
    print("included")


def cbom(text):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if errors is not None:
        e = getattr(errors, "data", None)
        where = "/".join(str(p) for p in getattr(e, "absolute_path", []))
        raise SystemExit(f"invalid CycloneDX 1.6 at {where}: {getattr(e, 'message', errors)}")
    print("valid")


def main():
    mode = sys.argv[1]
    text = sys.stdin.read()
    if mode == "dsse":
        dsse(json.loads(text))
    elif mode == "proof":
        proof(json.loads(text))
    elif mode == "cbom":
        cbom(text)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
