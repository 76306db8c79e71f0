"""Soak test of `imgclf serve`: good photos, junk, oversize uploads and slow clients for minutes on end.

    python benchmarks/serve_soak.py             # trains a tiny model first (~10 s); 10 minutes, 32 clients
    python benchmarks/serve_soak.py runs/x/best.int8.onnx --minutes 2 --clients 8 --json soak.json

Starts ``imgclf serve MODEL`` (default options) on 127.0.0.1 and a free port in a subprocess, then for
``--minutes`` runs ``--clients`` client threads, each on its own keep-alive connection, sending a mix of
requests: good photos (the real JPEGs of ../shared/datasets/weather-photos.tar.gz, 158 to 2500 px; generated
JPEGs when it is absent), junk bytes and a PostScript header (415), truncated JPEGs (422), pixel-bomb PNG
headers (413), bodies over the upload limit by Content-Length and chunked (413). Beside them ``--slow``
clients dribble a request's headers or body, a piece a second, and reconnect each time the server cuts
them off. The server's RSS is read from /proc/PID/status every 2 s. At the end the clients stop, /health
must show an empty queue, and SIGTERM is sent with the slow clients still connected.

Prints counts per status code, 5xx other than 503 (target 0), connection errors, p50/p99 latency and
images/s of good requests, how long slow clients were held, RSS after warm-up against max and last
(target within 20 %), the server's log (tracebacks: target 0) and the seconds from SIGTERM to exit; then
one JSON line (also written to ``--json FILE``). Clients and server share this machine's cores.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "weather-photos.tar.gz"
BOUNDARY = "imgclf-soak-boundary"
MAX_UPLOAD = 20 * 1024 ** 2  # imgclf serve's default --max-upload-mb
MIX = {"good": 0.72, "junk": 0.06, "postscript": 0.02, "truncated": 0.05, "bomb": 0.07, "oversize": 0.06,
       "oversize-chunked": 0.02}


# --- what is sent ------------------------------------------------------------------------------------

def good_photos(n: int = 96, seed: int = 0) -> tuple[list[tuple[str, bytes]], str]:
    """n JPEGs spread over the archive's classes -> (photos, where from)."""
    if PHOTOS.exists():
        with tarfile.open(PHOTOS) as tf:  # two passes: seeking back in a gzip stream would re-read it
            names = [m.name for m in tf if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg"))]
        keep = set(names[:: max(1, len(names) // n)][:n])
        out = []
        with tarfile.open(PHOTOS) as tf:
            for m in tf:
                if m.name in keep:
                    out.append((m.name.rsplit("/", 1)[-1], tf.extractfile(m).read()))
        return out, f"{PHOTOS.name} ({len(out)} of {len(names)})"
    from PIL import Image

    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        w, h = int(rng.integers(160, 1600)), int(rng.integers(160, 1200))
        base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1, 3) + rng.normal(0, 25, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
        out.append((f"generated{i}.jpg", buf.getvalue()))
    return out, f"{n} generated JPEGs ({PHOTOS.name} absent)"


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A 1x1 PNG whose header claims width x height (3.6 gigapixels): refused from the header, never decoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def multipart(files: list[tuple[str, bytes]]) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def head(port: int, length: int | None) -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{size}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()


# --- a minimal HTTP/1.1 client (httpx would measure itself on 2 cores) --------------------------------

class Conn:
    def __init__(self, port: int, timeout: float = 60.0):
        self.port, self.timeout, self.sock, self.buf = port, timeout, None, b""

    def open(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
            self.buf = b""
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.buf += chunk

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        headers = dict((k.strip().lower(), v.strip()) for k, v in (h.split(":", 1) for h in lines[1:]))
        length = int(headers.get("content-length", 0))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(lines[0].split()[1]), headers, body

    def post(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        self.open().sendall(head(self.port, len(body)) + body)
        return self.response()

    def post_oversize(self, chunked: bool) -> int:
        """A body over the upload limit: the server should answer (413) before it has all arrived; the
        rest is never sent, so the connection is closed after the answer."""
        sock = self.open()
        start = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="huge.jpg"\r\n'
                 "Content-Type: image/jpeg\r\n\r\n").encode()  # a well-formed start: refused for its size
        piece = os.urandom(1024 ** 2)
        sent = 0
        try:
            sock.sendall(head(self.port, None if chunked else MAX_UPLOAD + 1024 ** 2)
                         + (b"%x\r\n%s\r\n" % (len(start), start) if chunked else start))
            while sent <= MAX_UPLOAD + 1024 ** 2 and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece[:65536])
                sent += len(piece) if chunked else 65536
            return self.response()[0]
        finally:
            self.close()


# --- the soak ------------------------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.statuses: dict[str, dict[int, int]] = {}
        self.latencies: list[float] = []
        self.images = 0
        self.conn_errors: dict[str, int] = {}
        self.slow: list[tuple[str, float, bool]] = []  # (kind, seconds held, answered 408)

    def add(self, kind: str, status: int, seconds: float, images: int = 0) -> None:
        with self.lock:
            by = self.statuses.setdefault(kind, {})
            by[status] = by.get(status, 0) + 1
            if kind == "good" and status == 200:
                self.latencies.append(seconds)
                self.images += images

    def error(self, kind: str) -> None:
        with self.lock:
            self.conn_errors[kind] = self.conn_errors.get(kind, 0) + 1


def client(port: int, k: int, photos, junk: dict[str, bytes], stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(k)
    kinds, weights = list(MIX), list(MIX.values())
    conn = Conn(port)
    while not stop.is_set():
        kind = rng.choices(kinds, weights)[0]
        t0 = time.perf_counter()
        try:
            if kind.startswith("oversize"):
                status = conn.post_oversize(chunked=kind.endswith("chunked"))
            else:
                files = [rng.choice(photos)] if kind == "good" else [(f"{kind}.jpg", junk[kind])]
                status = conn.post(multipart(files))[0]
        except (OSError, ConnectionError, ValueError, IndexError):
            tally.error(kind)
            conn.close()
            time.sleep(0.05)
            continue
        tally.add(kind, status, time.perf_counter() - t0, images=1)
        if status == 503:  # shed: as Retry-After asks, though sooner (a soak wants load)
            time.sleep(0.1)
    conn.close()


def slow_client(port: int, kind: str, stop: threading.Event, term: threading.Event, tally: Tally,
                sockets: set) -> None:
    """Dribbles a request (headers, or a body after whole headers) a piece a second until cut off, again
    and again until ``stop``. From ``term`` on (set just before SIGTERM), being cut off is the shutdown's
    doing: not counted."""
    body = multipart([("slow.jpg", b"\xff\xd8" + b"\0" * 4000)])
    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=1.0)
        except OSError:
            if not term.is_set():
                tally.error("slow")
            time.sleep(1)
            continue
        sockets.add(sock)
        t0, got = time.monotonic(), b""
        pieces = [b"X-Slow-%d: 1\r\n" % i for i in range(1000)] if kind == "headers" else list(body)
        try:
            sock.sendall(b"POST /predict HTTP/1.1\r\n" if kind == "headers" else head(port, len(body)))
            while not stop.is_set():
                try:
                    chunk = sock.recv(4096)
                except TimeoutError:
                    sock.sendall(pieces.pop(0) if kind == "headers" else bytes([pieces.pop(0)]))
                    continue
                if not chunk:
                    break
                got += chunk
        except (OSError, IndexError):
            pass
        finally:
            sockets.discard(sock)
            sock.close()
        if not term.is_set():
            with tally.lock:
                tally.slow.append((kind, time.monotonic() - t0, got.startswith(b"HTTP/1.1 408")))


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str) -> dict:
    conn = Conn(port, timeout=30)
    try:
        conn.open().sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return json.loads(conn.response()[2])
    finally:
        conn.close()


def tiny_model(root: Path) -> Path:
    """A seed CNN trained for 2 epochs on 4 colours at 32 px (~10 s): the server's work here is decoding
    and refusing, not the model."""
    from PIL import Image

    import imgclf

    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "grey": (128, 128, 128)}
    for split, n in (("train", 24), ("test", 6)):
        for name, colour in colours.items():
            (root / "data" / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = np.clip(np.asarray(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / "data" / split / name / f"{i}.png")
    os.environ.setdefault("IMGCLF_HOME", str(root / "home"))
    print("training a tiny model (seed-cnn, 2 epochs, 4 colours at 32 px)...", flush=True)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its epoch lines are not the figures
        result = imgclf.train(data=str(root / "data"), model="seed-cnn", epochs=2, batch_size=16, precision="fp32",
                              project=str(root / "runs"), name="soak", progress=False)
    return Path(result.run_dir)


def machine() -> str:
    cpu, flags = platform.processor() or "?", set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
        cpu, flags = info.get("model name", cpu), set(info.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{cpu} ({isa}), {os.cpu_count()} CPUs, Python {platform.python_version()}"


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000, q)), 1) if values else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="run folder, checkpoint or .onnx file (default: train a tiny one)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--slow", type=int, default=None, help="slow clients (default: clients / 8, at least 2)")
    ap.add_argument("--json", help="also write the JSON line to this file")
    args = ap.parse_args(argv)
    n_slow = args.slow if args.slow is not None else max(2, args.clients // 8)
    command = " ".join(["python", "benchmarks/serve_soak.py", *(argv if argv is not None else sys.argv[1:])])

    with tempfile.TemporaryDirectory(prefix="imgclf-soak-") as tmp:
        model = args.model or str(tiny_model(Path(tmp)))
        photos, source = good_photos()
        junk = {"junk": os.urandom(3000), "postscript": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
                "truncated": photos[0][1][: len(photos[0][1]) // 3], "bomb": bomb_png()}
        port = free_port()
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "imgclf", "serve", model, "--port", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    info = http_get(port, "/model")
                    break
                except (OSError, ConnectionError, ValueError):
                    if server.poll() is not None or time.monotonic() > deadline:
                        sys.exit(f"server did not start: {log_path.read_text()[-2000:]}")
                    time.sleep(0.2)
            seconds = args.minutes * 60
            warm_at = min(60.0, seconds / 4)
            print(f"imgclf serve soak: {args.minutes:g} min, {args.clients} clients + {n_slow} slow; model "
                  f"{info['arch']} ({info['format']}, {info['precision']}); good photos: {source}", flush=True)
            print(f"machine: {machine()}\ncommand: {command}", flush=True)

            stop, slow_stop, term, tally, slow_socks = (threading.Event(), threading.Event(), threading.Event(),
                                                        Tally(), set())
            rss: list[tuple[float, float]] = []
            threads = [threading.Thread(target=client, args=(port, k, photos, junk, stop, tally), daemon=True)
                       for k in range(args.clients)]
            slow = [threading.Thread(target=slow_client, args=(port, ("headers", "body")[k % 2], slow_stop, term,
                                                               tally, slow_socks), daemon=True) for k in range(n_slow)]
            t0 = time.monotonic()
            for t in threads + slow:
                t.start()
            while (elapsed := time.monotonic() - t0) < seconds:
                if (m := rss_mb(server.pid)) is not None:
                    rss.append((elapsed, m))
                if server.poll() is not None:
                    sys.exit(f"the server died: {log_path.read_text()[-2000:]}")
                time.sleep(min(2.0, max(0.0, seconds - elapsed)))
            stop.set()
            for t in threads:
                t.join(60)
            wall = time.monotonic() - t0
            health = http_get(port, "/health")
            kept = len(slow_socks)  # SIGTERM with the slow clients still connected
            term.set()  # they stay connected, and no longer count being cut off
            t_term = time.monotonic()
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
                exit_s = round(time.monotonic() - t_term, 2)
            except subprocess.TimeoutExpired:
                exit_s = None
            slow_stop.set()
            for t in slow:
                t.join(5)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        log_lines = log_path.read_text(errors="replace").splitlines()

    statuses: dict[int, int] = {}
    for by in tally.statuses.values():
        for status, n in by.items():
            statuses[status] = statuses.get(status, 0) + n
    warm = next((m for t, m in rss if t >= warm_at), rss[-1][1] if rss else None)
    peak, last = (max(m for _, m in rss), rss[-1][1]) if rss else (None, None)
    by_kind = {kind: [s for k, s, _ in tally.slow if k == kind] for kind in ("headers", "body")}
    result = {
        "machine": machine(), "command": command, "minutes": args.minutes, "seconds": round(wall, 1),
        "clients": args.clients, "slow_clients": n_slow, "photos": source,
        "model": {k: info[k] for k in ("arch", "format", "precision")},
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "statuses_by_kind": {kind: {str(k): v for k, v in sorted(by.items())} for kind, by in tally.statuses.items()},
        "server_errors_not_503": sum(n for s, n in statuses.items() if s >= 500 and s != 503),
        "connection_errors": tally.conn_errors,
        "good": {"ok": len(tally.latencies), "p50_ms": percentile(tally.latencies, 50),
                 "p99_ms": percentile(tally.latencies, 99), "images_per_s": round(tally.images / wall, 1)},
        "slow_cut": {kind: {"n": len(v), "median_s": round(float(np.median(v)), 1) if v else None,
                            "max_s": round(max(v), 1) if v else None} for kind, v in by_kind.items()},
        "slow_answered_408": sum(a for _, _, a in tally.slow),
        "queued_at_end": health.get("queued"),
        "rss_mb": {"warm": round(warm, 1) if warm else None, "warm_at_s": round(warm_at, 1),
                   "max": round(peak, 1) if peak else None, "last": round(last, 1) if last else None,
                   "max_growth_pct": round(100 * (peak - warm) / warm, 1) if warm else None,
                   "last_growth_pct": round(100 * (last - warm) / warm, 1) if warm else None,
                   "samples": len(rss)},
        "server_log": {"lines": len(log_lines), "tracebacks": sum("Traceback" in line for line in log_lines),
                       "errors": sum(line.startswith("ERROR") for line in log_lines)},
        "sigterm_to_exit_s": exit_s, "slow_connected_at_sigterm": kept,
    }
    r = result
    print("statuses: " + "  ".join(f"{k} {v:,}" for k, v in r["statuses"].items()))
    for kind, by in r["statuses_by_kind"].items():
        print(f"  {kind:<17} " + "  ".join(f"{k} {v:,}" for k, v in by.items()))
    print(f"5xx other than 503: {r['server_errors_not_503']}   connection errors: {sum(tally.conn_errors.values())} "
          f"{tally.conn_errors or ''}")
    g = r["good"]
    print(f"good photos: {g['ok']:,} answered, p50 {g['p50_ms']} ms, p99 {g['p99_ms']} ms, {g['images_per_s']} img/s")
    print("slow clients cut off: " + ", ".join(f"{kind} {v['n']} (median {v['median_s']} s, max {v['max_s']} s)"
                                               for kind, v in r["slow_cut"].items())
          + f"; {r['slow_answered_408']} answered 408")
    m = r["rss_mb"]
    print(f"server RSS: {m['warm']} MB at {m['warm_at_s']} s (warm), max {m['max']} MB ({m['max_growth_pct']:+} %), "
          f"last {m['last']} MB ({m['last_growth_pct']:+} %), {m['samples']} samples")
    print(f"queue at the end: {r['queued_at_end']}   server log: {r['server_log']['lines']} lines, "
          f"{r['server_log']['tracebacks']} tracebacks, {r['server_log']['errors']} ERROR lines")
    print(f"SIGTERM to exit: {r['sigterm_to_exit_s']} s ({kept} slow clients connected)")
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
