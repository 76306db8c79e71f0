"""Serve a model over HTTP: a JSON API and a web page to try it.

    imgclf serve runs/cifar10-seed-cnn                  # or best.onnx / best.int8.onnx; http://127.0.0.1:8000
    app = imgclf.deploy.serve.create_app("runs/x/best.onnx")    # a FastAPI app, e.g. for TestClient or another server

Endpoints:

    POST /predict?top_k=3   multipart, one or more image files (any field name; "files" in the docs)
                            -> {"predictions": [{"source": name, "top": [{"class", "probability"}, ...]}]}
    POST /explain           multipart, one image in "files" (+ optional "target" class: a name or an index)
                            -> image/png: its heat map over it (501 for a model that cannot explain)
    GET  /health            {"status": "ok", "queued": ..., "batches": ..., "images": ...}
    GET  /model             classes, input size, preprocessing, metrics from the checkpoint, "explain"
    GET  /                  the web page: drop, pick or photograph an image; top-k bars
    GET  /docs              the OpenAPI page (Swagger UI from local files; /openapi.json is the spec)

Errors answer ``{"detail": "<file>: what is wrong"}`` with: 400 no file sent; 408 the body did not arrive
within ``body_timeout_s`` (the connection is closed); 413 request body over ``max_upload_bytes``, more
than ``max_files`` files, or an image over ``max_pixels`` (read from the header before decoding: a
decompression bomb is never decoded); 415 not a JPEG, PNG, WebP, GIF, BMP or TIFF image; 422 corrupt or
truncated image; 503 + Retry-After when ``max_queue`` images are already accepted and not yet answered,
or when ``max_connections`` connections are open (/explain: ``max_explain_queue`` heat maps waiting); 501
/explain for an ONNX model (no gradients). A request with one bad file is refused whole. Images
are decoded on a thread pool by the same loader as training, then micro-batched (see :mod:`.batcher`).

Under load and abuse (:func:`serve`, or :func:`uvicorn_options` for a uvicorn of your own): a client that
has not sent a request's headers ``header_timeout_s`` after connecting or after its last answer is
disconnected (slowloris), an idle keep-alive connection after ``keep_alive_s``; on SIGTERM or Ctrl-C the
server stops accepting, closes idle connections at once and uploads still arriving after a second, lets
requests in progress finish for up to ``shutdown_timeout_s``, then exits. A client that leaves before its
answer is logged as one line. The server starts no processes: threads only (decoding, forward passes).
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import ctypes
import io
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..._version import __version__
from ...classifier import load
from ...data.images import (
    FORMATS,
    FORMATS_HELP,
    ImageTooLarge,
    Preprocess,
    UnsupportedFormat,
    draft,
    image_bytes,
    preprocess_image,
)
from ...errors import ImgclfError
from ...explain import can_explain, explain_arrays
from ...inference import BaseClassifier, Prediction
from ...onnx_runtime import is_onnx_runtime_file, load_onnx
from .batcher import MicroBatcher, Overloaded
from .guards import BodyLimit, BodyTimeout, client_name, log, uvicorn_options


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 64                      # images in one forward pass
    max_wait_ms: float = 5.0                 # how long the first request waits for company
    max_queue: int = 512                     # images waiting at most; then 503
    max_files: int = 16                      # files in one request; more -> 413
    max_upload_bytes: int = 20 * 1024 ** 2   # request body; more -> 413
    max_pixels: int = 50_000_000             # width x height from the header; more -> 413 (never decoded)
    max_top_k: int = 100
    max_explain_queue: int = 4               # /explain requests waiting for their heat map at most; then 503
    decode_threads: int = max(2, os.cpu_count() or 2)
    decode_memory_mb: int = 512              # what decodes in progress may take together (see DecodeBudget)
    # the connection, under load and abuse (see the module's docstring)
    max_connections: int = 64                # open connections or requests in progress; more -> 503
    header_timeout_s: float = 5.0            # a request's headers, from connect or the last answer
    body_timeout_s: float = 10.0             # a request's whole body, from its headers; late -> 408, closed
    keep_alive_s: int = 5                    # an idle keep-alive connection is closed after this
    shutdown_timeout_s: int = 5              # SIGTERM: requests in progress get this long, then are cancelled


class ApiError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def decode_upload(data: bytes, name: str, spec: Preprocess, max_pixels: int,
                  budget: DecodeBudget | None = None) -> np.ndarray:
    """Upload bytes -> (H, W, C) uint8 through the training loader; ApiError(413/415/422) when unusable.
    ``budget``: the memory all decodes in progress may take together (waits for room)."""
    from PIL import Image, UnidentifiedImageError

    try:  # reads the header only, and only with the plugins of the formats the loader reads
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ApiError(415, f"{name}: not a {FORMATS_HELP} image; send one of those") from None
    except Image.DecompressionBombError:  # Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS), also header-only
        raise ApiError(413, f"{name}: too many pixels for a photo (a decompression bomb?); limit "
                            f"{max_pixels:,} pixels") from None
    except Exception as e:  # a plugin's errors on these bytes, whatever their type (see data/images.py)
        raise ApiError(422, f"{name}: corrupt image header ({type(e).__name__}: {e}); re-save the image") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ApiError(413, f"{name}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                            "(a decompression bomb?); send a smaller image")
    draft(img, spec.image_size)  # the size it will decode at (a large JPEG: reduced)
    with budget.hold(image_bytes(img)) if budget is not None else contextlib.nullcontext():
        try:  # from the bytes, as predict reads a file: a large JPEG is decoded at a reduced scale (open_image)
            return preprocess_image(data, spec)
        except ImgclfError as e:
            reason = str(e).split(": ", 1)[-1]  # the loader names the source "<image bytes>"; name the upload
            status = 415 if isinstance(e, UnsupportedFormat) else 413 if isinstance(e, ImageTooLarge) else 422
            raise ApiError(status, f"{name}: {reason}") from None


class DecodeBudget:
    """Memory that the decodes in progress may take together, in bytes; a decode waits until its image fits.
    A decode takes ``COST`` times its decoded size (the conversions after it: alpha onto white, high bit
    depths scaled; measured 2.5-3x), never more than the whole budget, so any image the loader accepts still
    decodes, alone. After a large one the C heap is trimmed: each decoding thread has its own malloc arena,
    which otherwise keeps the freed pages, so the next large image, decoded on another thread, adds its own
    (4 concurrent requests of two 7,000 x 7,000 RGBA PNGs, 0.2 MB each, took the server from 254 MB to
    1,450 MB and left it at 1,399 MB)."""

    COST = 3
    TRIM_AFTER = 32 * 1024 ** 2  # decoded bytes past which the heap is trimmed (cheap next to such a decode)

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self._room = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int):
        need = min(self.total, self.COST * nbytes)
        with self._room:
            self._room.wait_for(lambda: self.used + need <= self.total)
            self.used += need
        try:
            yield
        finally:
            if nbytes >= self.TRIM_AFTER:
                _trim_heap()
            with self._room:
                self.used -= need
                self._room.notify_all()


def _trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc's malloc_trim; elsewhere nothing to do)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def model_info(clf: BaseClassifier) -> dict[str, Any]:
    meta, spec = clf.meta, clf.preprocess
    fmt = next((k for k in ("onnx", "tflite") if meta.get(k)), "checkpoint")
    return {
        "arch": meta.get("arch", {}).get("name"),
        "format": fmt,
        "precision": (meta.get(fmt) or {}).get("precision", "fp32"),
        "path": str(clf.path) if clf.path else None,
        "classes": clf.classes,
        "input": {"image_size": spec.image_size, "channels": spec.channels, "mean": list(spec.mean),
                  "std": list(spec.std), "resize": spec.resize},
        "test_metrics": _brief_metrics(meta.get("test_metrics")),
        "data": meta.get("data", {}).get("source"),
        "explain": can_explain(clf),  # POST /explain answers (a PyTorch model with a cam_layer), else 501
        "imgclf_version": __version__,
    }


def _brief_metrics(m: dict | None) -> dict | None:
    if not m:
        return None
    return {k: m[k] for k in ("n", "loss", "top1", "top5", "per_class_accuracy") if k in m}


def create_app(model: str | Path | BaseClassifier, config: ServeConfig = ServeConfig(), device: str = "auto"):
    """A FastAPI app serving ``model`` (run folder, checkpoint, .onnx/.ort/.tflite file or a loaded classifier)."""
    if is_onnx_runtime_file(model):
        clf = load_onnx(model, device=device, spin=False)  # idle ORT threads must not starve the decoders
    else:
        clf = load(model, device=device)
    batcher: MicroBatcher | None = None
    decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="imgclf-decode")
    decode_budget = DecodeBudget(config.decode_memory_mb * 1024 ** 2)
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app):
        nonlocal batcher
        batcher = app.state.batcher = MicroBatcher(clf, config.max_batch, config.max_wait_ms, config.max_queue)
        await batcher.start()
        yield
        await batcher.stop()
        decode_pool.shutdown(wait=False, cancel_futures=True)
        explain_pool.shutdown(wait=False, cancel_futures=True)

    info = model_info(clf)
    app = FastAPI(title="imgclf", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"{info['arch']} ({info['format']}, {info['precision']}): "
                              f"{len(clf.classes)} classes. The page at / tries it in a browser.")
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes, paths=("/predict", "/explain"))
    app.add_middleware(BodyTimeout, seconds=config.body_timeout_s)  # outermost: times the client's own pace
    _add_docs(app)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, exc: ClientDisconnect):
        # Starlette raises ClientDisconnect when the client closes its connection during the upload; left
        # alone it reaches uvicorn, which logs it with a 65-line traceback. One line says all there is.
        if not request.scope.get("imgclf.closed"):  # else the server closed it (shutdown) and said so
            log.info("client %s left before the answer (%s %s)", client_name(request.scope.get("client")),
                     request.method, request.url.path)
        return Response(status_code=499)  # nginx's "client closed request"; nobody is there to read it

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
        form, files = await _upload(request, config.max_files, config.max_upload_bytes,
                                    f"at most {config.max_files} images per request")
        try:
            # the images count in the queue from here, before decoding, until the answer or any error
            with batcher.reserve(len(files)):
                loop = asyncio.get_running_loop()
                names = [f.filename or f"file {i + 1}" for i, f in enumerate(files)]
                datas = [await f.read() for f in files]
                await form.close()  # the spooled copies go now (again in `finally`, harmless, on errors)
                arrays = await asyncio.gather(*(
                    loop.run_in_executor(decode_pool, decode_upload, d, n, clf.preprocess, config.max_pixels,
                                         decode_budget)
                    for d, n in zip(datas, names)))
                del datas
                if await request.is_disconnected():  # gone while its images were decoded: no forward pass
                    raise ClientDisconnect
                probs = await batcher.probs(list(arrays), reserved=True)
        except Overloaded:
            raise _overloaded() from None
        finally:
            await form.close()
        preds = [Prediction(source=n, top=top) for n, top in zip(names, clf.rank(probs, top_k))]
        return {"predictions": [p.to_dict() for p in preds]}

    # A heat map: a forward and a backward pass, one at a time on its own thread, on a copy of the model made on
    # first use: its hook on the model's layer must never see the micro-batcher's forward passes.
    explain_pool = ThreadPoolExecutor(1, thread_name_prefix="imgclf-explain")
    explainer: list[Any] = []
    explaining = [0]  # /explain requests waiting for or in a heat-map pass (touched on the event loop only)

    def overlay_png(array: np.ndarray, name: str, target: str | int | None) -> tuple[bytes, str, float]:
        if not explainer:
            twin = copy.copy(clf)
            twin.model = copy.deepcopy(clf.model)
            explainer.append(twin)
        found = explain_arrays(explainer[0], [array], [name], target)[0]
        buf = io.BytesIO()
        found.overlay().save(buf, "PNG")
        return buf.getvalue(), found.label, found.probability

    @app.post("/explain", summary="Heat map over one image, as a PNG", response_class=Response,
              description="The image as the model saw it (centre crop, scaled up by a whole factor to at least "
                          "224 px) with a heat map over it, red where the evidence for the class lies: `target` "
                          "(a class name or index), by default the top class. Headers X-Class and "
                          "X-Probability name it (X-Class percent-encoded). Only a PyTorch model can explain; an "
                          "ONNX model answers 501 (see `explain` in GET /model).",
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["files"],
                  "properties": {"files": {"type": "string", "format": "binary", "description": "one image"},
                                 "target": {"type": "string", "description": "class to explain (name or "
                                                                             "index); default: the top class"}}}}}}},
              responses={200: {"content": {"image/png": {}}, "description": "the heat-map overlay, PNG"},
                         400: {"description": "no file sent"},
                         413: {"description": "body too large, more than one file, or too many pixels"},
                         415: {"description": "not an image"},
                         422: {"description": "corrupt image, or an unknown target class"},
                         501: {"description": "this model cannot explain (ONNX: no gradients)"},
                         503: {"description": "heat maps queued; retry after Retry-After seconds"}})
    async def explain(request: Request):
        if not info["explain"]:
            raise ApiError(501, f"this {info['format']} model cannot explain its answers: a heat map needs a "
                                "PyTorch model's gradients; serve the run folder or its .safetensors checkpoint")
        form, files = await _upload(request, 1, config.max_upload_bytes, "/explain takes one image per request")
        try:
            target = _explain_target(form.get("target"), clf.classes)
            if explaining[0] >= config.max_explain_queue:
                raise HTTPException(503, f"busy: {explaining[0]} heat maps queued; retry shortly",
                                    headers={"Retry-After": "1"})
            explaining[0] += 1
            try:
                loop = asyncio.get_running_loop()
                name = files[0].filename or "file 1"
                data = await files[0].read()
                await form.close()
                array = await loop.run_in_executor(decode_pool, decode_upload, data, name, clf.preprocess,
                                                   config.max_pixels, decode_budget)
                del data
                if await request.is_disconnected():  # gone while its image was decoded: no heat map
                    raise ClientDisconnect
                png, label, probability = await loop.run_in_executor(explain_pool, overlay_png, array, name,
                                                                     target)
            finally:
                explaining[0] -= 1
        finally:
            await form.close()
        return Response(png, media_type="image/png",
                        headers={"X-Class": quote(label), "X-Probability": f"{probability:.6f}"})

    def _overloaded():
        return HTTPException(503, f"busy: {batcher.queued} images queued; retry shortly",
                             headers={"Retry-After": "1"})

    app.state.classifier, app.state.config = clf, config
    return app


async def _upload(request: Request, max_files: int, max_bytes: int, limit: str):
    """The request's multipart form and its files -> (form, files); 413 past ``max_files`` (``limit`` says what is
    allowed), 400 without a file (the form is closed then; otherwise the caller closes it)."""
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 8, max_part_size=max_bytes)
    except StarletteHTTPException as e:
        if "Too many files" in str(e.detail):
            raise ApiError(413, f"too many files: {limit}") from None
        raise
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if not files:
        await form.close()
        raise ApiError(400, "no image in the request: send multipart/form-data with one or more files (field "
                            "name 'files')")
    return form, files


def _explain_target(value: Any, classes: list[str]) -> str | int | None:
    """The form's ``target``: absent or empty -> None (the top class); a class name, or an index -> itself;
    else ApiError(422)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ApiError(422, "target must be a form field (a class name or index), not a file")
    if value in classes:
        return value
    if value.strip().isdigit() and int(value) < len(classes):
        return int(value)
    raise ApiError(422, f"unknown target class {value[:100]!r}; the model knows {', '.join(classes[:20])}")


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
    """Run the app with uvicorn until Ctrl-C or SIGTERM (then within ``config.shutdown_timeout_s`` and a
    second or two: see the module's docstring)."""
    import uvicorn

    app = create_app(model, config, device=device)
    clf = app.state.classifier
    print(f"serving {model_info(clf)['arch']} ({len(clf.classes)} classes) from {clf.path} "
          f"at http://{host}:{port}/  (API docs: /docs)", flush=True)
    # python-multipart logs each malformed body as a bare line on stderr; the client gets the reason in its 400
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options(config))
