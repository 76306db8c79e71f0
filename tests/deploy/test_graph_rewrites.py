"""int8 graph rewrites: ReLU and BatchNorm before max-pooling, GELU as a table, each exact."""
import shutil

import numpy as np
import onnx
import pytest
import torch

import imgclf
from imgclf.deploy import export as export_mod
from imgclf.deploy import graph_rewrites
from imgclf.deploy import int8 as int8_mod
from imgclf.onnx_runtime import load_onnx


def test_relu_before_maxpool_is_exact(tiny_run, tiny_onnx, tmp_path):
    """The graph rewrite int8 relies on changes no output (max-pool commutes with ReLU)."""
    _, out = tiny_onnx
    model = onnx.load(str(out))
    assert graph_rewrites.relu_before_maxpool(model) == 3  # seed-cnn pools before each of its three ReLUs
    onnx.save(model, str(tmp_path / "swapped.onnx"))
    shutil.copy(out, tmp_path / "orig.onnx")
    a, b = load_onnx(tmp_path / "orig.onnx"), load_onnx(tmp_path / "swapped.onnx")
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(a.logits(x), b.logits(x), atol=1e-5)


def _fastnet_onnx(path, negate_first_scale=False):
    """A FastNet (random weights, non-trivial BatchNorm statistics) tiny_onnx the way export_onnx does."""
    import warnings

    torch.manual_seed(0)
    model = imgclf.create_model("fastnet-s", num_classes=4).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.2, 2), m.bias.data.uniform_(-0.5, 0.5)
    if negate_first_scale:
        model.blocks[1][2].weight.data[0] = -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False,
                          opset_version=export_mod.OPSET, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return onnx.load(str(path))


def test_bn_before_maxpool_is_exact(tmp_path):
    """FastNet pools between conv and BatchNorm; moving the BatchNorm (positive scales) in front of the
    pool lets ORT fold it into the conv and changes no output beyond float rounding."""
    import onnxruntime as ort

    model = _fastnet_onnx(tmp_path / "a.onnx")
    assert graph_rewrites.bn_before_maxpool(model) == 3
    ops = [n.op_type for n in model.graph.node]
    assert all(ops[i + 1] == "MaxPool" for i, op in enumerate(ops) if op == "BatchNormalization")
    assert "Gelu" in ops  # opset 20: GELU is one node, which int8 keeps as one float round trip
    onnx.save(model, str(tmp_path / "b.onnx"))
    x = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    a, b = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for f in ("a.onnx", "b.onnx"))
    assert np.abs(a).max() > 0.01 and np.allclose(a, b, atol=1e-4)
    # a negative scale flips the order of the pooled values: that BatchNorm must stay where it is
    assert graph_rewrites.bn_before_maxpool(_fastnet_onnx(tmp_path / "c.onnx", negate_first_scale=True)) == 2


def _gelu_qdq(x_scale, x_zero, y_scale, y_zero):
    """uint8 -> DequantizeLinear -> Gelu -> QuantizeLinear -> uint8: how a quantizer leaves a GELU."""
    from onnx import TensorProto, helper, numpy_helper

    consts = [numpy_helper.from_array(np.array(v, dt), n) for v, dt, n in
              [(x_scale, np.float32, "xs"), (x_zero, np.uint8, "xz"), (y_scale, np.float32, "ys"),
               (y_zero, np.uint8, "yz")]]
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]),
             helper.make_node("Gelu", ["xf"], ["g"]),
             helper.make_node("QuantizeLinear", ["g", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.UINT8, [256])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [256])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("x_scale,x_zero,y_scale,y_zero", [(0.03, 128, 0.025, 10), (0.05, 60, 0.05, 5),
                                                           (0.01, 200, 0.004, 40)])
def test_gelu_in_int8_matches_gelu_on_every_code(x_scale, x_zero, y_scale, y_zero):
    """QLinearSigmoid + QLinearMul give, for each of the 256 uint8 inputs, GELU's code within one step
    (x * sigmoid(1.702 x) is within 0.021 of GELU), and the float round trip is gone from the graph."""
    import onnxruntime as ort

    model = _gelu_qdq(x_scale, x_zero, y_scale, y_zero)
    codes = np.arange(256, dtype=np.uint8)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": codes})[0].astype(int)

    exact = run(model)
    assert int8_mod.gelu_in_int8(model) == 1
    assert [n.op_type for n in model.graph.node] == ["QLinearSigmoid", "QLinearMul"]
    fast = run(model)
    assert len(set(exact)) > 20  # the test covers a real range of outputs
    assert np.abs(fast - exact).max() <= max(1, round(0.021 / y_scale + 0.5))


def test_gelu_in_int8_leaves_other_gelus_alone():
    """A GELU whose output is not re-quantized (or the tanh form) stays as it is."""
    model = _gelu_qdq(0.03, 128, 0.025, 10)
    model.graph.node[1].attribute.extend([onnx.helper.make_attribute("approximate", "tanh")])
    assert int8_mod.gelu_in_int8(model) == 0 and len(model.graph.node) == 3
    signed = _gelu_qdq(0.03, 0, 0.025, 0)  # int8 activations: the uint8 sigmoid cannot be multiplied in
    for init in signed.graph.initializer:
        if init.name in ("xz", "yz"):
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(0, np.int8), init.name))
    assert int8_mod.gelu_in_int8(signed) == 0
