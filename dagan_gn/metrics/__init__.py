"""Metrics: FID/KID/IS through torch-fidelity with offline Inception weights (``fidelity``, ``inception``),
test-set reconstruction error (``reconstruction``), memorization checks (``memorization``), the quality-metric
registry (``registry``, built-in entries in ``builtin_metrics``) and the measures and report of ``dagan assess``
(``variant_set``, ``assess_report``).

Submodules are imported on use (torch-fidelity pulls in torchvision), e.g.
``from dagan_gn.metrics.fidelity import compute_fidelity``.
"""

__all__ = ["fidelity", "inception", "reconstruction", "memorization"]
