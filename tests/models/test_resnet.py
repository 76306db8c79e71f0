"""ResNet: parameter counts and zero-initialised residual branches."""

from imgclf.models import create_model

from support import trainable


def test_resnet18_count():
    # The standard CIFAR ResNet-18 (kuangliu/pytorch-cifar) has 11,173,962 parameters at 10 classes.
    assert trainable(create_model("resnet18", num_classes=10)) == 11_173_962


def test_resnet_zero_init_residual_option():
    zero = create_model("resnet18", num_classes=10)
    assert all(b.bn2.weight.abs().sum() == 0 for b in zero.stages.modules() if hasattr(b, "bn2"))
    plain = create_model("resnet18", num_classes=10, zero_init_residual=False)
    assert plain.arch_args["zero_init_residual"] is False
    assert all(b.bn2.weight.abs().sum() > 0 for b in plain.stages.modules() if hasattr(b, "bn2"))
