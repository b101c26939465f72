"""The boto3 KMS client the test-data scripts (kms_wrap.py, kms_mac.py) use
against the KMS tests/vectors/kms_server.py serves at `endpoint`."""

import boto3


def client(endpoint):
    return boto3.client(
        "kms",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
