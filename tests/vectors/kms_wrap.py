"""Test data of the `legacy-aws-kms` format (SPEC 5.1), made with boto3
against the KMS tests/vectors/kms_server.py serves: stdin
{"endpoint": URL, "uuids": [...], "wrong_context": [indexes]}; stdout
{"key_arn": ARN, "wraps": [{"dek": b64, "blob": b64}]} — each DEK random,
encrypted by KMS `Encrypt` under a new symmetric key with the encryption
context {"pqmig:wrapper_uuid": uuid} (another uuid's for the indexes in
wrong_context).
"""

import base64
import json
import os
import sys
import uuid as uuid_mod

from kms_client import client

req = json.load(sys.stdin)
kms = client(req["endpoint"])
arn = kms.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["Arn"]
wraps = []
for i, uuid in enumerate(req["uuids"]):
    dek = os.urandom(32)
    # Another row's uuid: a fresh one (changing a character could give
    # back the same text).
    other = str(uuid_mod.uuid4())
    context = {"pqmig:wrapper_uuid": uuid if i not in req["wrong_context"] else other}
    blob = kms.encrypt(KeyId=arn, Plaintext=dek, EncryptionContext=context)["CiphertextBlob"]
    wraps.append({"dek": base64.b64encode(dek).decode(), "blob": base64.b64encode(blob).decode()})
json.dump({"key_arn": arn, "wraps": wraps}, sys.stdout)
