"""The shop's app: notes kept in PostgreSQL, over HTTP.

GET /healthz   ok (does not touch the database, so the app stays in
               rotation while the database is replaced)
GET /notes     every note, one per line
POST /notes    adds the request body as a note

The database is found by name (`db`, answered by kiln's DNS server), and
resolved again at every connection, so it follows the db role's servers.
"""

import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg2

SCHEMA = "CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text NOT NULL)"


def run(sql, args=()):
    """Runs `sql` in a transaction on a new connection; the rows it returns."""
    conn = psycopg2.connect(
        host=os.environ.get("DB_HOST", "db"),
        dbname="shop",
        user="shop",
        password=os.environ["DB_PASSWORD"],
        connect_timeout=5,
    )
    try:
        with conn, conn.cursor() as cur:
            cur.execute(SCHEMA)
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


class Handler(BaseHTTPRequestHandler):
    def reply(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/healthz":
            return self.reply(200, "ok\n")
        if self.path != "/notes":
            return self.reply(404, "not found\n")
        try:
            rows = run("SELECT body FROM notes ORDER BY id")
        except psycopg2.Error as e:
            return self.reply(503, f"database: {e}\n")
        self.reply(200, "".join(f"{body}\n" for (body,) in rows))

    def do_POST(self):
        if self.path != "/notes":
            return self.reply(404, "not found\n")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace").strip()
        if not body:
            return self.reply(400, "empty note\n")
        try:
            run("INSERT INTO notes (body) VALUES (%s)", (body,))
        except psycopg2.Error as e:
            return self.reply(503, f"database: {e}\n")
        self.reply(201, "added\n")


# The first process of its server: SIGTERM would be ignored without a handler.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler).serve_forever()
