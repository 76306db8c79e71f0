"""Serve a model over HTTP: a JSON API and a web page to try it.

    imgclf serve runs/cifar10-seed-cnn                  # or best.onnx / best.int8.onnx; http://127.0.0.1:8000
    app = imgclf.deploy.serve.create_app("runs/x/best.onnx")    # a FastAPI app, e.g. for TestClient or another server

Endpoints:

    POST /predict?top_k=3   multipart, one or more image files (any field name; "files" in the docs)
                            -> {"predictions": [{"source": name, "top": [{"class", "probability"}, ...]}]}
    GET  /health            {"status": "ok", "queued": ..., "batches": ..., "images": ...}
    GET  /model             classes, input size, preprocessing, metrics from the checkpoint
    GET  /                  the web page: drop, pick or photograph an image; top-k bars
    GET  /docs              the OpenAPI page (Swagger UI from local files; /openapi.json is the spec)

Errors answer ``{"detail": "<file>: what is wrong"}`` with: 400 no file sent; 413 request body over
``max_upload_bytes``, more than ``max_files`` files, or an image over ``max_pixels`` (read from the header
before decoding: a decompression bomb is never decoded); 415 not an image; 422 corrupt or truncated
image; 503 + Retry-After when ``max_queue`` images are already waiting. A request with one bad file is
refused whole. Images are decoded on a thread pool by the same loader as training, then micro-batched
(see :mod:`.batcher`).
"""
from __future__ import annotations

import asyncio
import io
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..._version import __version__
from ...classifier import load
from ...data.images import Preprocess, preprocess_image
from ...errors import ImgclfError
from ...inference import BaseClassifier, Prediction
from ...onnx_runtime import load_onnx
from .batcher import MicroBatcher, Overloaded


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 64                      # images in one forward pass
    max_wait_ms: float = 5.0                 # how long the first request waits for company
    max_queue: int = 512                     # images waiting at most; then 503
    max_files: int = 16                      # files in one request; more -> 413
    max_upload_bytes: int = 20 * 1024 ** 2   # request body; more -> 413
    max_pixels: int = 50_000_000             # width x height from the header; more -> 413 (never decoded)
    max_top_k: int = 100
    decode_threads: int = max(2, os.cpu_count() or 2)


class ApiError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def decode_upload(data: bytes, name: str, spec: Preprocess, max_pixels: int) -> np.ndarray:
    """Upload bytes -> (H, W, C) uint8 through the training loader; ApiError(413/415/422) when unusable."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise ApiError(415, f"{name}: not an image (send a JPEG, PNG, WebP, GIF, BMP or TIFF file)") from None
    except Image.DecompressionBombError:  # Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS), also header-only
        raise ApiError(413, f"{name}: too many pixels for a photo (a decompression bomb?); limit "
                            f"{max_pixels:,} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ApiError(422, f"{name}: corrupt image header ({e}); re-save the image") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ApiError(413, f"{name}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                            "(a decompression bomb?); send a smaller image")
    try:  # from the bytes, as predict reads a file: a large JPEG is decoded at a reduced scale (open_image)
        return preprocess_image(data, spec)
    except ImgclfError as e:
        reason = str(e).split(": ", 1)[-1]  # the loader names the source "<image bytes>"; name the upload instead
        raise ApiError(422, f"{name}: {reason}") from None


def model_info(clf: BaseClassifier) -> dict[str, Any]:
    meta, spec = clf.meta, clf.preprocess
    onnx_meta = meta.get("onnx") or {}
    return {
        "arch": meta.get("arch", {}).get("name"),
        "format": "onnx" if onnx_meta else "checkpoint",
        "precision": onnx_meta.get("precision", "fp32"),
        "path": str(clf.path) if clf.path else None,
        "classes": clf.classes,
        "input": {"image_size": spec.image_size, "channels": spec.channels, "mean": list(spec.mean),
                  "std": list(spec.std), "resize": spec.resize},
        "test_metrics": _brief_metrics(meta.get("test_metrics")),
        "data": meta.get("data", {}).get("source"),
        "imgclf_version": __version__,
    }


def _brief_metrics(m: dict | None) -> dict | None:
    if not m:
        return None
    return {k: m[k] for k in ("n", "loss", "top1", "top5", "per_class_accuracy") if k in m}


def create_app(model: str | Path | BaseClassifier, config: ServeConfig = ServeConfig(), device: str = "auto"):
    """A FastAPI app serving ``model`` (run folder, checkpoint, .onnx file or a loaded classifier)."""
    if str(model).lower().endswith(".onnx"):
        clf = load_onnx(model, device=device, spin=False)  # idle ORT threads must not starve the decoders
    else:
        clf = load(model, device=device)
    batcher: MicroBatcher | None = None
    decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="imgclf-decode")
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app):
        nonlocal batcher
        batcher = MicroBatcher(clf, config.max_batch, config.max_wait_ms, config.max_queue)
        await batcher.start()
        yield
        await batcher.stop()
        decode_pool.shutdown(wait=False, cancel_futures=True)

    info = model_info(clf)
    app = FastAPI(title="imgclf", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"{info['arch']} ({info['format']}, {info['precision']}): "
                              f"{len(clf.classes)} classes. The page at / tries it in a browser.")
    app.add_middleware(_BodyLimit, max_bytes=config.max_upload_bytes, paths=("/predict",))
    _add_docs(app)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    @app.get("/health", summary="Liveness and queue state")
    async def health():
        return {"status": "ok", "queued": batcher.queued, "max_queue": config.max_queue,
                "batches": batcher.batches, "images": batcher.images}

    @app.get("/model", summary="Classes, input size, preprocessing and test metrics of the served model")
    async def model_route():
        return info

    @app.post("/predict", summary="Top-k classes for one or more images",
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["files"],
                  "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                           "description": f"1 to {config.max_files} image files"}}}}}}},
              responses={400: {"description": "no file sent"},
                         413: {"description": "body too large, too many files, or too many pixels"},
                         415: {"description": "not an image"}, 422: {"description": "corrupt image"},
                         503: {"description": "queue full; retry after Retry-After seconds"}})
    async def predict(request: Request, top_k: int = Query(3, ge=1, le=config.max_top_k)):
        try:
            form = await request.form(max_files=config.max_files, max_fields=config.max_files + 8,
                                      max_part_size=config.max_upload_bytes)
        except StarletteHTTPException as e:
            if "Too many files" in str(e.detail):
                raise ApiError(413, f"too many files: at most {config.max_files} images per request") from None
            raise
        try:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not files:
                raise ApiError(400, "no image in the request: send multipart/form-data with one or more "
                                    "files (field name 'files')")
            if not batcher.has_room(len(files)):
                raise _overloaded()
            loop = asyncio.get_running_loop()
            names = [f.filename or f"file {i + 1}" for i, f in enumerate(files)]
            datas = [await f.read() for f in files]
            arrays = await asyncio.gather(*(
                loop.run_in_executor(decode_pool, decode_upload, d, n, clf.preprocess, config.max_pixels)
                for d, n in zip(datas, names)))
        finally:
            await form.close()
        try:
            probs = await batcher.probs(list(arrays))
        except Overloaded:
            raise _overloaded() from None
        preds = [Prediction(source=n, top=top) for n, top in zip(names, clf.rank(probs, top_k))]
        return {"predictions": [p.to_dict() for p in preds]}

    def _overloaded():
        return HTTPException(503, f"busy: {batcher.queued} images queued; retry shortly",
                             headers={"Retry-After": "1"})

    app.state.classifier, app.state.config = clf, config
    return app


class _BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413, by Content-Length before reading any of
    it, and by counting for chunked uploads, so a huge upload is never buffered."""

    def __init__(self, app, max_bytes: int, paths: tuple[str, ...]):
        self.app, self.max_bytes, self.paths = app, max_bytes, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        detail = f"request body over {self.max_bytes / 1024 ** 2:.1f} MB; send fewer or smaller images"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, detail)
            return message

        return await self.app(scope, limited, send)


def _add_docs(app) -> None:
    """/docs with Swagger UI from local files: FastAPI's default page loads it from a CDN, which an
    offline machine cannot reach. Without the swagger-ui-bundle package, /docs says where the spec is."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None
    if swagger_ui_path:
        from fastapi.staticfiles import StaticFiles

        app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        if not swagger_ui_path:
            return HTMLResponse('<p>The OpenAPI spec is at <a href="/openapi.json">/openapi.json</a> '
                                "(install swagger-ui-bundle-v2 for the interactive page).</p>")
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="imgclf API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          config: ServeConfig = ServeConfig(), log_level: str = "info") -> None:
    """Run the app with uvicorn until Ctrl-C."""
    import uvicorn

    app = create_app(model, config, device=device)
    clf = app.state.classifier
    print(f"serving {model_info(clf)['arch']} ({len(clf.classes)} classes) from {clf.path} "
          f"at http://{host}:{port}/  (API docs: /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
