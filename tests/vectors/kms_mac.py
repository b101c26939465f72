"""HMAC peppers in AWS KMS, as moto serves it (tests/vectors/kms_server.py),
made and used with boto3: stdin {"endpoint": URL, "messages": [b64]};
stdout {"key_arn": ARN, "macs": [b64]} — a new HMAC_256 key
(GENERATE_VERIFY_MAC) and KMS GenerateMac (HMAC_SHA_256) of each message,
the values pqmig must have written.
"""

import base64
import json
import sys

from kms_client import client

req = json.load(sys.stdin)
kms = client(req["endpoint"])
arn = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["Arn"]
macs = []
for m in req["messages"]:
    mac = kms.generate_mac(KeyId=arn, MacAlgorithm="HMAC_SHA_256", Message=base64.b64decode(m))["Mac"]
    macs.append(base64.b64encode(mac).decode())
json.dump({"key_arn": arn, "macs": macs}, sys.stdout)
