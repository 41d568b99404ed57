"""The jobs: one module per thing a user runs, each an entry function that reads plan → run → report.

``extract_patches``, ``train``, ``augment``, ``evaluate`` (a checkpoint's FID/KID/IS), ``memorization`` and
``downstream`` (the checks on a synthetic patch file), ``cifar10_study`` (the normalization study) and ``demo``.
Jobs import the libraries (ingest, store, datasets, nets, training, metrics); no library imports a job.
"""
