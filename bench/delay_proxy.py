#!/usr/bin/env python3
"""A registry one round trip away: an HTTP proxy (Python stdlib only) that holds every request
for DELAY_MS before forwarding it to a local registry, and logs each request with its start
and end times, so bench/run.sh can count requests and round trips per push.

    python3 bench/delay_proxy.py LISTEN_PORT UPSTREAM_HOST:PORT DELAY_MS LOG_FILE

Keep-alive connections, Content-Length and chunked request bodies; answers are forwarded
whole with Content-Length (the benchmark's blobs are small). A TLS ClientHello is closed at
once, as a plain-http registry's port would refuse it, so clients that try https first fall
back to http without waiting. The Host header is passed on, so the registry's Location
headers name the proxy.

Log lines: `START_NS END_NS METHOD TARGET STATUS` (monotonic nanoseconds). `report LOG`
(second form) prints `REQUESTS ROUND_TRIPS`: the longest chain of requests that ran one after
another (each started after the previous one ended).

    python3 bench/delay_proxy.py report LOG_FILE
"""

import http.client
import http.server
import socket
import sys
import threading
import time

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


def report(path):
    reqs = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4:
                reqs.append((int(parts[0]), int(parts[1])))
    reqs.sort()
    depth = []
    for i, (start, _) in enumerate(reqs):
        d = 1
        for j in range(i):
            if reqs[j][1] <= start:
                d = max(d, depth[j] + 1)
        depth.append(d)
    print(len(reqs), max(depth, default=0))


def main():
    port, upstream, delay_ms, log_path = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    up_host, up_port = upstream.rsplit(":", 1)
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def body(self):
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def forward(self):
            start = time.monotonic_ns()
            data = self.body()
            time.sleep(delay_ms / 1000)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            if data or self.command in ("PUT", "POST", "PATCH"):
                headers["Content-Length"] = str(len(data))
            conn = http.client.HTTPConnection(up_host, int(up_port), timeout=120)
            try:
                conn.request(self.command, self.path, body=data, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                if self.command == "HEAD":
                    length = resp.getheader("Content-Length")
                    if length is not None:
                        self.send_header("Content-Length", length)
                else:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                self.wfile.flush()
                status = resp.status
            finally:
                conn.close()
            end = time.monotonic_ns()
            with lock:
                log.write(f"{start} {end} {self.command} {self.path.split('?')[0]} {status}\n")

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = forward

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        # socketserver's default backlog is 5: a client opening more connections at once
        # than that would see resets (and retry), which a registry would not cause.
        request_queue_size = 128

        def finish_request(self, request, client_address):
            try:
                first = request.recv(1, socket.MSG_PEEK)
            except OSError:
                return
            if not first or first[0] == 0x16:
                return
            super().finish_request(request, client_address)

    Server(("127.0.0.1", int(port)), Handler).serve_forever()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "report":
        report(sys.argv[2])
    else:
        main()
