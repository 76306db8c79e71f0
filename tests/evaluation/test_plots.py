"""Plots keep their pixel size in edge cases: learning-rate drops, no validation data, many classes."""
from PIL import Image

from imgclf.evaluation.plots import PLOT_SIZES


def test_plots_keep_their_size_in_edge_cases(tmp_path):
    """LR drops marked, no validation data, many classes: same pixel size, no error."""
    import io
    import math

    from imgclf.evaluation.plots import plot_confusion, plot_curves, plot_per_class

    history = [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.5, "val_loss": math.nan, "val_acc": math.nan,
                "lr": 0.1 if e < 3 else 0.02, "seconds": 1.0} for e in range(1, 6)]
    k = 30
    cm = [[5 if i == j else 1 for j in range(k)] for i in range(k)]
    share = [[v / sum(row) for v in row] for row in cm]
    names = [f"class-with-a-long-name-{i}" for i in range(k)]
    for name, png in (("curves.png", plot_curves(history, best_epoch=2, schedule="plateau")),
                      ("confusion_matrix.png", plot_confusion(cm, share, names)),
                      ("per_class_accuracy.png", plot_per_class({n: 5 / 34 for n in names}, 5 / 34, 1020))):
        with Image.open(io.BytesIO(png)) as img:
            assert img.size == PLOT_SIZES[name], name
