"""A webhook receiver for tests/service_events.rs: checks each request's Standard Webhooks signature with
the specification's reference library (standardwebhooks) and appends what it got to a JSON-lines file;
answers 204, or 401 when the signature does not verify.

    receiver.py PORT SECRET_FILE LOG
"""

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("secret_file")
    parser.add_argument("log")
    args = parser.parse_args()
    with open(args.secret_file) as f:
        hook = Webhook(f.read().strip())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            try:
                event, verified = hook.verify(body, dict(self.headers)), True
            except WebhookVerificationError as e:
                event, verified = {"error": str(e)}, False
            record = {
                "verified": verified,
                "path": self.path,
                "content_type": self.headers.get("content-type"),
                "webhook_id": self.headers.get("webhook-id"),
                "event": event,
            }
            with open(args.log, "a") as log:
                log.write(json.dumps(record) + "\n")
            self.send_response(204 if verified else 401)
            self.end_headers()

        def log_message(self, *_args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
