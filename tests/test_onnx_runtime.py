"""The ONNX Runtime wrapper: big batches run as one slice per core with the same outputs."""
import numpy as np
import torch

from imgclf import onnx_runtime
from imgclf.onnx_runtime import load_onnx


def test_big_batches_run_as_one_slice_per_core(tiny_onnx):
    """A batch of >= 2 x MIN_SLICE images is cut into a slice per core, run side by side on the single-threaded
    session, with the logits of the whole batch in one piece; smaller batches and threads=1 stay whole."""
    _, out = tiny_onnx
    clf = load_onnx(out, threads=2)
    assert clf.workers == 2 and clf.slice_session is not None
    sizes = []
    run = clf.slice_session.run
    clf.slice_session.run = lambda names, feed: sizes.append(len(feed["image"])) or run(names, feed)
    x = torch.randint(0, 256, (2 * onnx_runtime.MIN_SLICE + 1, 3, 32, 32), dtype=torch.uint8)
    whole = clf.session.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(clf.logits(x).numpy(), whole, atol=1e-5)
    assert sorted(sizes) == [onnx_runtime.MIN_SLICE, onnx_runtime.MIN_SLICE + 1]
    clf.logits(x[:2 * onnx_runtime.MIN_SLICE - 1])
    assert len(sizes) == 2  # too small to cut
    assert load_onnx(out, threads=1).slice_session is None
