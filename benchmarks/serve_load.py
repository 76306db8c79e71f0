"""Loopback load test of `imgclf serve`: 1, 8 and 32 concurrent clients, a fixed number of requests each.

    python benchmarks/serve_load.py runs/cifar10-jpeg-seed-cnn              # checkpoint
    python benchmarks/serve_load.py runs/x/best.int8.onnx --requests 20 --json

Starts ``imgclf serve MODEL`` on 127.0.0.1 and a free port in a subprocess, waits for /health, then for
each concurrency level runs that many clients (one asyncio process, one keep-alive connection each), each
sending ``--requests`` POST /predict requests of ``--images`` real CIFAR-10 test JPEGs. Prints
requests/s, images/s, p50/p99 latency, the error count and the server's mean forward-pass batch size per
level, then one JSON line.
Client and server share this machine's cores: the figures are the pair's, not the server's alone.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import numpy as np

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def test_jpegs(n: int) -> list[tuple[str, bytes]]:
    out = []
    with tarfile.open(CIFAR) as tf:
        for m in tf:
            if m.isfile() and m.name.startswith("test/") and m.name.endswith(".jpg"):
                out.append((m.name.rsplit("/", 1)[-1], tf.extractfile(m).read()))
                if len(out) == n:
                    break
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(photos: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "imgclf-load-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
             f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for name, data in photos]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def post(reader, writer, port: int, body: bytes, ctype: str) -> int:
    """One POST /predict on a kept-alive connection -> status. A minimal HTTP/1.1 client on purpose: httpx's
    async client tops out near 150 requests/s on 2 cores (it would measure itself, not the server)."""
    writer.write(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    length = next(int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:"))
    await reader.readexactly(length)
    return int(head[0].split()[1])


async def level(url: str, port: int, clients: int, requests: int, images: int, photos) -> dict:
    latencies, errors, statuses = [], 0, {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        before = (await c.get("/health")).json()

    async def client(k: int):
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in range(requests):
                j = (k * requests + i) * images
                body, ctype = multipart([photos[(j + m) % len(photos)] for m in range(images)])
                t0 = time.perf_counter()
                try:
                    status = await asyncio.wait_for(post(reader, writer, port, body, ctype), 60)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    errors += 1
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                statuses[status] = statuses.get(status, 0) + 1
                errors += status != 200
                latencies.append(time.perf_counter() - t0)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        after = (await c.get("/health")).json()
    n = clients * requests
    lat = np.array(latencies) * 1000
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "requests": n, "images_per_request": images, "seconds": round(wall, 2),
            "requests_per_s": round(n / wall, 1), "images_per_s": round(n * images / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "errors": errors, "statuses": statuses,
            "mean_batch": round((after["images"] - before["images"]) / max(batches, 1), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="run folder, checkpoint or .onnx file")
    ap.add_argument("--clients", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=25, help="requests per client")
    ap.add_argument("--images", type=int, default=1, help="images per request")
    ap.add_argument("--json", action="store_true", help="print only the JSON")
    args = ap.parse_args()

    photos = test_jpegs(256)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "imgclf", "serve", args.model, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        model = httpx.get(url + "/model").json()
        results = []
        for clients in args.clients:
            results.append(asyncio.run(level(url, port, clients, args.requests, args.images, photos)))
            if not args.json:
                r = results[-1]
                print(f"{clients:>3} clients  {r['requests']:>5} requests  {r['requests_per_s']:>8,.1f} req/s  "
                      f"{r['images_per_s']:>8,.1f} img/s  p50 {r['p50_ms']:>7.1f} ms  p99 {r['p99_ms']:>7.1f} ms  "
                      f"errors {r['errors']}  mean batch {r['mean_batch']}", flush=True)
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps({"model": {k: model[k] for k in ("arch", "format", "precision", "path")},
                      "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0], "levels": results}))


if __name__ == "__main__":
    main()
