"""What one KMS request costs the test KMS (tests/vectors/kms_server.py:
moto under werkzeug's threaded server), in server CPU from /proc/PID/stat,
next to a hello-world WSGI app under the same werkzeug server answering
the same requests: the floor of the HTTP server alone. One keep-alive
connection sends N raw requests of each kind (moto checks no signature).

    .venv/bin/python benches/kms_server_cost.py [N]     (default 2000)

README (aws, Throughput) quotes its numbers.
"""

import base64
import http.client
import json
import os
import subprocess
import sys
import time

import boto3

HELLO = """
import logging
from werkzeug.serving import make_server
logging.getLogger("werkzeug").setLevel(logging.WARNING)
def app(environ, start_response):
    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")])
    return [b"{}"]
server = make_server("127.0.0.1", 0, app, threaded=True)
print(server.server_port, flush=True)
server.serve_forever()
"""


def cpu_seconds(pid):
    """User + system CPU of process `pid` so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(args):
    """A server process that prints its port first; (process, port)."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE)
    return proc, int(proc.stdout.readline())


def measure(name, proc, port, headers, body, n):
    """Send `n` requests on one connection (after 100 to warm up); print
    the rate and the server's CPU per request."""
    conn = http.client.HTTPConnection("127.0.0.1", port)

    def send(count):
        for _ in range(count):
            conn.request("POST", "/", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200, (resp.status, data[:200])

    send(100)
    cpu0, t0 = cpu_seconds(proc.pid), time.time()
    send(n)
    cpu1, t1 = cpu_seconds(proc.pid), time.time()
    print(f"{name}: {n / (t1 - t0):.0f} req/s, server CPU {1000 * (cpu1 - cpu0) / n:.2f} ms/request")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    moto, port = start(["tests/vectors/kms_server.py"])
    kms = boto3.client(
        "kms",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    context = {"pqmig:wrapper": "x"}
    blob = kms.encrypt(KeyId=key, Plaintext=os.urandom(32), EncryptionContext=context)["CiphertextBlob"]
    base = {
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Date": "20261205T000000Z",
        "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20261205/us-east-1/kms/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64,
    }
    decrypt = (
        {**base, "X-Amz-Target": "TrentService.Decrypt"},
        json.dumps({"CiphertextBlob": base64.b64encode(blob).decode(), "EncryptionContext": context}),
    )
    describe = ({**base, "X-Amz-Target": "TrentService.DescribeKey"}, json.dumps({"KeyId": key}))
    try:
        measure("moto Decrypt", moto, port, *decrypt, n)
        measure("moto DescribeKey", moto, port, *describe, n)
    finally:
        moto.kill()
        moto.wait()
    hello, port = start(["-c", HELLO])
    try:
        measure("werkzeug hello-world", hello, port, *decrypt, n)
    finally:
        hello.kill()
        hello.wait()


if __name__ == "__main__":
    main()
