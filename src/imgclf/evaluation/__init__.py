"""Judging a model: metrics, scoring (evaluate, calibrate, TTA), plots, the HTML report, run comparison and
dataset inspection. Public entry points: :func:`imgclf.evaluate`, :func:`imgclf.report`, :func:`imgclf.compare`,
:func:`imgclf.runs`, :func:`imgclf.inspect`."""
