"""Heat maps of where a model looked for its answer: LayerCAM (Jiang et al. 2021, "LayerCAM: Exploring
Hierarchical Class Activation Maps for Localization", IEEE TIP 30), Grad-CAM's element-wise variant, or Grad-CAM
itself (Selvaraju et al. 2017, arXiv 1610.02391).

    heat, logits, classes = cam(model, x_normalised)         # (N, H, W) in [0, 1], (N, K), (N,)
    clf.explain(["cat.jpg"])[0].overlay().save("cat.png")   # the same through a Classifier

Both weigh the activations of one feature map (``model.cam_layer()``) by the gradient of the explained class's
logit: Grad-CAM by its mean over the map, one weight a channel; LayerCAM by its positive part at each place.
LayerCAM is the default because it stays faithful on a finer map: on the stride-16 maps the models name,
hiding its hottest fifth of a photo costs the predicted class more than hiding random regions of that size
far more often than Grad-CAM's heat does (docs/explain.md, benchmarks/gradcam.py). Written out rather than
taken from captum: it is twenty lines on the one hook every registered model has.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data.tensors import to_tensor
from .errors import ImgclfError
from .inference import eval_chunk

OVERLAY_MIN_SIDE = 224  # overlays of small inputs are scaled up by a whole factor to at least this side


@dataclass
class Explanation:
    """One image's heat map: ``heat`` (S, S) float32 in [0, 1] over the model's S x S input, for class
    ``label`` (with its ``probability``); ``image`` is the input as the model saw it (centre crop, S x S)."""
    source: str
    heat: np.ndarray
    label: str
    probability: float
    image: np.ndarray = field(repr=False)

    def overlay(self, size: int | None = None, alpha: float = 0.45, cmap: str = "jet"):
        """The input scaled to ``size`` (default: S times the smallest whole factor reaching 224 px) with the
        heat drawn over it in ``cmap`` colours -> a PIL RGB image."""
        from matplotlib import colormaps  # imported on first use: matplotlib is slow to import

        side = self.heat.shape[0]
        size = size or side * math.ceil(OVERLAY_MIN_SIDE / side)
        rgb = self.image if self.image.shape[2] == 3 else np.repeat(self.image, 3, axis=2)
        base = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC), np.float32)
        heat = np.asarray(Image.fromarray(self.heat).resize((size, size), Image.BILINEAR))
        colour = colormaps[cmap](np.clip(heat, 0, 1))[..., :3] * 255
        return Image.fromarray(np.clip((1 - alpha) * base + alpha * colour, 0, 255).astype(np.uint8))


def can_explain(clf) -> bool:
    """Whether ``clf`` can give heat maps: a PyTorch classifier whose model names a ``cam_layer``
    (an ONNX model has no gradients; a model without the hook has no layer to explain)."""
    model = getattr(clf, "model", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(clf, "normalizer"):
        return False
    cam_layer = getattr(model, "cam_layer", None)
    return callable(cam_layer) and cam_layer() is not None


METHODS = ("layercam", "gradcam")


def cam(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor | None = None, method: str = "layercam"
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heat maps (N, H, W) float32 in [0, 1], float32 logits (N, num_classes) and the classes explained (N,)
    for normalised images ``x`` (N, C, H, W): ``target`` (N,) class indices, where one below 0 (or None, for
    all) means the image's top class; ``method`` one of :data:`METHODS`. Runs in eval mode and float32; the
    model's training mode and its parameters' requires_grad are as before afterwards."""
    if method not in METHODS:
        raise ImgclfError(f"unknown heat-map method {method!r}; choose {' or '.join(METHODS)}")
    layer = model.cam_layer() if hasattr(model, "cam_layer") else None
    if layer is None:
        raise ImgclfError(f"{type(model).__name__} names no layer to explain (cam_layer); heat maps need one")
    kept: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        # The graph starts here: the gradient wanted is the activations', so the layers below need none,
        # which spares their backward pass and memory, and frozen parameters make no difference.
        output = output.detach().requires_grad_(True)
        kept.append(output)
        return output

    was_training, flags = model.training, [p.requires_grad for p in model.parameters()]
    handle = layer.register_forward_hook(keep)
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            logits = model(x.float()).float()
            if not kept or kept[0].ndim != 4:
                raise ImgclfError(f"{type(model).__name__}.cam_layer() gave no (N, C, h, w) feature map")
            acts = kept[0]
            top = logits.argmax(1)
            target = top if target is None else torch.where(target.to(top.device) < 0, top, target.to(top.device))
            # Images are independent in eval mode, so the gradient of the sum is each image's own.
            (grads,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), acts)
        grads = grads.float()
        weights = F.relu(grads) if method == "layercam" else grads.mean((2, 3), keepdim=True)
        heat = F.relu((weights * acts.detach().float()).sum(1, keepdim=True))
        heat = F.interpolate(heat, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = heat.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]  # an all-zero map stays zero
        return (heat / peak).clamp(0, 1), logits.detach(), target
    finally:
        handle.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def explain_arrays(clf, arrays: list[np.ndarray], sources: list[str], target=None, batch_size: int = 32,
                   method: str = "layercam") -> list[Explanation]:
    """Heat maps of a PyTorch classifier (``model``, ``normalizer``, ``classes``, ``temperature``) for
    preprocessed (S, S, C) uint8 images. ``target``: None (each image's top class), a class name or index
    for all, or a list of them, one an image; ``method``: see :func:`cam`."""
    targets = target if isinstance(target, (list, tuple)) else [target] * len(arrays)
    if len(targets) != len(arrays):
        raise ImgclfError(f"{len(targets)} targets for {len(arrays)} images")
    index = [-1 if t is None else _class_index(clf.classes, t) for t in targets]
    device = next(clf.model.parameters()).device
    side = clf.preprocess.image_size
    step = eval_chunk(max(1, batch_size), side * side, device)
    out: list[Explanation] = []
    for i in range(0, len(arrays), step):
        part = arrays[i:i + step]
        x = clf.normalizer(to_tensor(np.stack(part)).to(device))
        heat, logits, chosen = cam(clf.model, x, torch.tensor(index[i:i + step], device=device), method)
        # the probability as predict gives it: calibrated by the checkpoint's temperature
        probs = torch.softmax(logits.cpu() / clf.temperature, dim=1).numpy()
        for j, (c, h) in enumerate(zip(chosen.tolist(), heat.cpu().numpy().astype(np.float32))):
            out.append(Explanation(sources[i + j], h, clf.classes[c], float(probs[j, c]), part[j]))
    return out


def _class_index(classes: list[str], target) -> int:
    if isinstance(target, str):
        if target not in classes:
            raise ImgclfError(f"unknown class {target!r}; the model knows {', '.join(classes[:10])}")
        return classes.index(target)
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target < len(classes):
        raise ImgclfError(f"target must be a class name or an index below {len(classes)}, got {target!r}")
    return int(target)


def write_overlays(clf, sources: list[str], outdir: Path, batch_size: int = 32) -> list[Path]:
    """One overlay PNG per image in ``outdir`` (created), named after the image's stem (-2, -3... when two
    share one), explaining each image's top class; explained ``batch_size`` at a time, so memory stays flat."""
    if outdir.exists() and not outdir.is_dir():
        raise ImgclfError(f"{outdir} is a file; give a folder for the heat maps")
    outdir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    written = []
    for i in range(0, len(sources), batch_size):
        for e in clf.explain(sources[i:i + batch_size], batch_size=batch_size):
            stem, n = Path(e.source).stem or "image", 1
            name = f"{stem}.png"
            while name.lower() in used:  # lower case: two names differing in case are one file on some disks
                n += 1
                name = f"{stem}-{n}.png"
            used.add(name.lower())
            e.overlay().save(outdir / name)
            written.append(outdir / name)
    return written
