"""Training: the Trainer and its parts (callbacks, optimizers, schedules, precision, augmentation, time budgets,
the run folder, several processes). The public entry point is :func:`imgclf.train`."""
