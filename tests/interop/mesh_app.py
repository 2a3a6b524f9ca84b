"""Servers and clients for the waypoint's end-to-end tests (tests/tests/waypoint_e2e.rs),
run inside the local mesh's pods. They share no code with Ambit: the standard library's
HTTP server, grpcio (generic handlers, raw bytes) and websockets.

  http PORT            HTTP/1.1 server: every request answers 200 with a JSON body of
                       its method, path and headers; GET /download/N streams N bytes of
                       stream(N) in 64 KiB writes.
  grpc PORT            gRPC server of service test.Echo: Unary (echo), Forbidden (echo),
                       Stream (the request is a count N; N messages "i" back).
  ws PORT              WebSocket echo server.
  named PORT NAME [fail]
                       HTTP/1.1 server answering {"server": NAME, "path": ...}; GET
                       /delay/MS answers after MS milliseconds; with `fail`, every
                       request answers 503. Each request is printed ("NAME PATH").
  digest N             sha256 of stream(N), hex.
  grpc-client ADDR     calls each method, prints one JSON object of what came back.
  ws-client URI N      sends N messages, checks each echo, prints "echoed N".
  slow HOST PORT       sends a request head one byte per second; prints how it ended.
"""
import asyncio
import hashlib
import json
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 64 * 1024


def stream(n):
    """Deterministic, position-dependent bytes: sha256 counter blocks."""
    sent, i = 0, 0
    while sent < n:
        block = b"".join(hashlib.sha256(b"%d" % (i * 2048 + k)).digest() for k in range(2048))
        i += 1
        take = block[: n - sent]
        sent += len(take)
        yield take


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def handle_any(self):
        if self.path.startswith("/download/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("content-length", str(n))
            self.end_headers()
            for chunk in stream(n):
                self.wfile.write(chunk)
            return
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(
            {"method": self.command, "path": self.path,
             "headers": {k.lower(): v for k, v in self.headers.items()}}
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = handle_any


class Named(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    name = "?"
    fail = False

    def log_message(self, *args):
        pass

    def do_GET(self):
        print(self.name, self.path, flush=True)
        if self.path.startswith("/delay/"):
            time.sleep(int(self.path.rsplit("/", 1)[1]) / 1000)
        body = json.dumps({"server": self.name, "path": self.path}).encode()
        self.send_response(503 if self.fail else 200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve_named(port, name, fail):
    handler = type("Handler", (Named,), {"name": name, "fail": fail})
    server = ThreadingHTTPServer(("0.0.0.0", port), handler)
    print("listening on", port, flush=True)
    server.serve_forever()


def serve_http(port):
    server = ThreadingHTTPServer(("0.0.0.0", port), Echo)
    print("listening on", port, flush=True)
    server.serve_forever()


def serve_grpc(port):
    import grpc
    from concurrent import futures

    def unary(request, context):
        return request

    def stream_(request, context):
        for i in range(int(request.decode())):
            yield b"%d" % i

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Forbidden": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream_),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("0.0.0.0:%d" % port)
    server.start()
    print("listening on", port, flush=True)
    server.wait_for_termination()


def serve_ws(port):
    from websockets.asyncio.server import serve

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async def main():
        async with serve(echo, "0.0.0.0", port):
            print("listening on", port, flush=True)
            await asyncio.Future()

    asyncio.run(main())


def grpc_client(addr):
    import grpc

    out = {}
    with grpc.insecure_channel(addr) as channel:
        for method in ("Unary", "Forbidden"):
            call = channel.unary_unary("/test.Echo/" + method)
            try:
                out[method] = {"ok": call(b"hello", timeout=20).decode()}
            except grpc.RpcError as e:
                out[method] = {"code": e.code().name, "details": e.details()}
        call = channel.unary_stream("/test.Echo/Stream")
        got = [m.decode() for m in call(b"10000", timeout=60)]
        out["Stream"] = {
            "count": len(got),
            "in_order": got == [str(i) for i in range(10000)],
        }
    print(json.dumps(out), flush=True)


def ws_client(uri, n):
    from websockets.sync.client import connect

    with connect(uri, open_timeout=20) as ws:
        for i in range(n):
            message = "message %d " % i + "x" * (i * 37 % 5000)
            ws.send(message)
            if ws.recv(timeout=20) != message:
                print("mismatch at", i, flush=True)
                sys.exit(1)
    print("echoed", n, flush=True)


def slow(host, port):
    head = b"GET /slow HTTP/1.1\r\nhost: slow\r\nx-filler: " + b"a" * 120 + b"\r\n\r\n"
    s = socket.create_connection((host, port), timeout=60)
    start = time.monotonic()
    try:
        for b in head:
            s.sendall(bytes([b]))
            s.settimeout(1.0)
            try:
                data = s.recv(4096)
                end = "closed" if not data else data.split(b"\r\n", 1)[0].decode()
                print(json.dumps({"ended": end, "after": time.monotonic() - start}), flush=True)
                return
            except socket.timeout:
                pass
    except OSError as e:
        print(json.dumps({"ended": "error " + str(e), "after": time.monotonic() - start}), flush=True)
        return
    print(json.dumps({"ended": "sent whole head", "after": time.monotonic() - start}), flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "http":
        serve_http(int(args[0]))
    elif cmd == "named":
        serve_named(int(args[0]), args[1], args[2:] == ["fail"])
    elif cmd == "grpc":
        serve_grpc(int(args[0]))
    elif cmd == "ws":
        serve_ws(int(args[0]))
    elif cmd == "digest":
        h = hashlib.sha256()
        for chunk in stream(int(args[0])):
            h.update(chunk)
        print(h.hexdigest())
    elif cmd == "grpc-client":
        grpc_client(args[0])
    elif cmd == "ws-client":
        ws_client(args[0], int(args[1]))
    elif cmd == "slow":
        slow(args[0], int(args[1]))
    else:
        sys.exit("unknown command " + cmd)
