"""The LiteRT conversion itself, run as a script by the converter's own Python (see litert_venv.py); imgclf
never imports it, since litert-torch cannot be installed beside imgclf (its xdsl pins typing-extensions
below what pydantic, and so FastAPI, needs).

    python litert_convert.py JOB.json

JOB.json: {"program": "m.pt2", "shape": [1, H, W, C], "out": "m.tflite", "int8_out": "m.int8.tflite" or
null, "calib": "calib.npy" or null}. The program is a ``torch.export`` of uint8 (N, H, W, C) pixels ->
{"logits": ...}, made by imgclf with the same torch version. int8 is ai-edge-quantizer's static int8 recipe
(int8 weights per channel, int8 activations, calibrated on the images in calib.npy), applied to the fp32
flatbuffer: the uint8 input stays uint8, the logits come out int8 with their scale and zero point.

The last line printed is JSON: {"ok": true} or {"ok": false, "error": "...", "op": "aten.x" or null}.
"""
from __future__ import annotations

import json
import re
import sys


def convert(job: dict) -> None:
    import litert_torch
    import numpy as np
    import torch

    program = torch.export.load(job["program"]).module()
    edge = litert_torch.convert(program, (), {"image": torch.zeros(job["shape"], dtype=torch.uint8)})
    edge.export(job["out"])
    if job.get("int8_out"):
        from ai_edge_quantizer import quantizer, recipe

        calib = np.load(job["calib"])
        q = quantizer.Quantizer(job["out"])
        q.load_quantization_recipe(recipe.static_wi8_ai8())
        stats = q.calibrate({"serving_default": [{"image": calib[i:i + 1]} for i in range(len(calib))]})
        q.quantize(stats).export_model(job["int8_out"], overwrite=True)


def unsupported_op(message: str) -> str | None:
    """The PyTorch op a conversion error names, if any (litert-torch: "Lowering not found: aten.x.default")."""
    m = re.search(r"(?:Lowering not found|not supported|unsupported)\W+(aten\.[\w.]+)", message, re.IGNORECASE) \
        or re.search(r"\b(aten\.[a-z_0-9]+)", message)
    return m.group(1).removesuffix(".default") if m else None


def main() -> int:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    try:
        convert(job)
    except Exception as e:  # the converter raises RuntimeError, ValueError, JAX's own types...
        message = " ".join(str(e).split())[:500] or type(e).__name__
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {message}", "op": unsupported_op(message)}))
        return 1
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
