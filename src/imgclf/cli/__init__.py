"""The ``imgclf`` command: a thin verb -> function layer over the Python API.

    imgclf train --data ../shared/datasets/cifar10-jpeg.tar.gz --epochs 10
    imgclf evaluate runs/cifar10-seed-cnn
    imgclf predict runs/cifar10-seed-cnn cat.jpg photos/ "more/*.png" --top-k 3
    imgclf export runs/cifar10-seed-cnn --format onnx --int8
    imgclf prune runs/cifar10-seed-cnn --amount 0.5
    imgclf serve runs/cifar10-seed-cnn/best.int8.onnx
    imgclf models

Each verb calls the public function of the same name with the same arguments. Bad input ends with
one ``error: ...`` line and exit status 2, never a traceback.

The verbs live by what they do: ``train.py`` (train), ``use.py`` (evaluate, predict, serve), ``ship.py``
(export, prune) and ``look.py`` (models, datasets, report, inspect, doctor, shards, compare, runs). They
import nothing from this package; it registers them on ``app`` below, in ``imgclf --help``'s order. A verb
imports what it calls inside its function, so ``imgclf --help`` and the start of every command stay fast.
"""
from __future__ import annotations

import os
import sys

import typer

from ..errors import ImgclfError
from . import look, ship, train, use

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Train, judge and ship convolutional image classifiers.")

for _verb in (train.train, use.evaluate, use.predict, look.models, look.datasets, ship.export, ship.prune,
              use.serve, look.report, look.inspect, look.doctor, look.shards, look.compare, look.runs):
    app.command()(_verb)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``imgclf`` console script and ``python -m imgclf``."""
    try:
        app(args=argv, prog_name="imgclf")
    except ImgclfError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        from ..utils import DISK_ERRNOS

        if e.errno not in DISK_ERRNOS:  # a bug, not the disk: the traceback is what helps
            raise
        where = f"{e.filename}: " if e.filename else ""
        typer.echo(f"error: {where}{os.strerror(e.errno)}; free disk space or check permissions, then run again",
                   err=True)
        sys.exit(2)
    except MemoryError:  # what was being built is gone with the stack; the process can still say so
        typer.echo("error: out of memory; use a smaller --batch-size or --eval-batch-size, --data-in-memory no, "
                   "or free memory", err=True)
        sys.exit(1)
