"""AWS KMS for tests/aws.rs: moto's KMS (server mode) on a loopback port,
with faults the test asks for, as AWS KMS answers them.

    kms_server.py            prints the port it listens on, then serves

POST /__faults with {"operation": "Decrypt", "status": 400,
"code": "ThrottlingException", "count": 5} makes the next 5 Decrypt
requests fail with that error (faults queue in order); GET /__faults says
how many of each are left; DELETE /__faults drops them. Everything else
is moto's.
"""

import json
import logging
import sys
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

faults = []
lock = threading.Lock()
moto = DomainDispatcherApplication(create_backend_app)


def reply(start_response, status, body, ctype="application/x-amz-json-1.1"):
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def app(environ, start_response):
    if environ["PATH_INFO"] == "/__faults":
        with lock:
            if environ["REQUEST_METHOD"] == "POST":
                size = int(environ.get("CONTENT_LENGTH") or 0)
                faults.append(json.loads(environ["wsgi.input"].read(size)))
            elif environ["REQUEST_METHOD"] == "DELETE":
                faults.clear()
            body = json.dumps(faults).encode()
        return reply(start_response, "200 OK", body, "application/json")
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    hit = None
    with lock:
        for f in faults:
            if f["count"] > 0 and target == "TrentService." + f["operation"]:
                f["count"] -= 1
                hit = dict(f)
                break
    if hit is not None:
        body = json.dumps({"__type": hit["code"], "message": hit.get("message", "injected by the test")})
        return reply(start_response, "%d Fault" % hit["status"], body.encode())
    return moto(environ, start_response)


# No line per request on stderr: nobody reads them.
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = make_server("127.0.0.1", 0, app, threaded=True)
print(server.server_port, flush=True)
sys.stdout.close()
server.serve_forever()
