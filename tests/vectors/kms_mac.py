"""HMAC peppers in AWS KMS, as moto serves it (tests/vectors/kms_server.py),
made and used with boto3: stdin {"endpoint": URL, "messages": [b64]};
stdout {"key_arn": ARN, "macs": [b64]} — a new HMAC_256 key
(GENERATE_VERIFY_MAC) and KMS GenerateMac (HMAC_SHA_256) of each message,
the values pqmig must have written.
"""

import base64
import json
import sys

import boto3

req = json.load(sys.stdin)
kms = boto3.client(
    "kms",
    region_name="us-east-1",
    endpoint_url=req["endpoint"],
    aws_access_key_id="test",
    aws_secret_access_key="test",
)
arn = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["Arn"]
macs = []
for m in req["messages"]:
    mac = kms.generate_mac(KeyId=arn, MacAlgorithm="HMAC_SHA_256", Message=base64.b64decode(m))["Mac"]
    macs.append(base64.b64encode(mac).decode())
json.dump({"key_arn": arn, "macs": macs}, sys.stdout)
