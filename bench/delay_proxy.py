#!/usr/bin/env python3
"""A registry one round trip away: an HTTP proxy (Python stdlib only) that holds every request
for DELAY_MS before forwarding it to a local registry, and logs each request with its start
and end times, so bench/run.sh can count requests and round trips per push.

    python3 bench/delay_proxy.py LISTEN_PORT UPSTREAM_HOST:PORT DELAY_MS LOG_FILE

Faithful apart from the delay: keep-alive on both sides (each client connection has its own
upstream connection, opened with the client's first request and reused, as a client's
connection to a registry would be), Nagle off and each answer written in one send (no
delayed-ACK stalls), so at DELAY_MS 0 a request costs about what it costs without the proxy.
Content-Length and chunked request bodies; answers are forwarded whole with Content-Length
(the benchmark's blobs are small). A TLS ClientHello is closed at once, as a plain-http
registry's port would refuse it, so clients that try https first fall back to http without
waiting. The Host header is passed on, so the registry's Location headers name the proxy.

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
        # TCP_NODELAY: an answer is one send, and nothing waits for the peer's delayed ACK.
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def setup(self):
            super().setup()
            self.upstream = None

        def finish(self):
            if self.upstream is not None:
                self.upstream.close()
            super().finish()

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

        def exchange(self, data, headers):
            """Send the request upstream on this connection's upstream connection (opened
            once, reused); a reused connection the registry closed while idle is reopened
            once (nothing was processed on it)."""
            for attempt in (0, 1):
                reused = self.upstream is not None
                if not reused:
                    self.upstream = http.client.HTTPConnection(up_host, int(up_port), timeout=120)
                try:
                    self.upstream.request(self.command, self.path, body=data, headers=headers)
                    resp = self.upstream.getresponse()
                    return resp, resp.read()
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                    self.upstream.close()
                    self.upstream = None
                    if not reused or attempt:
                        raise

        def forward(self):
            start = time.monotonic_ns()
            data = self.body()
            time.sleep(delay_ms / 1000)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            if data or self.command in ("PUT", "POST", "PATCH"):
                headers["Content-Length"] = str(len(data))
            resp, payload = self.exchange(data, headers)
            if resp.will_close:
                self.upstream.close()
                self.upstream = None
            out = [f"HTTP/1.1 {resp.status} {resp.reason}\r\n"]
            for k, v in resp.getheaders():
                if k.lower() not in HOP and k.lower() != "content-length":
                    out.append(f"{k}: {v}\r\n")
            if self.command == "HEAD":
                length = resp.getheader("Content-Length")
                if length is not None:
                    out.append(f"Content-Length: {length}\r\n")
            else:
                out.append(f"Content-Length: {len(payload)}\r\n")
            out.append("\r\n")
            head = "".join(out).encode("latin-1")
            self.wfile.write(head if self.command == "HEAD" else head + payload)
            self.wfile.flush()
            end = time.monotonic_ns()
            with lock:
                log.write(f"{start} {end} {self.command} {self.path.split('?')[0]} {resp.status}\n")

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
