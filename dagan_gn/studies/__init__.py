"""Studies: sweeps that train many runs and tabulate their metrics (``cifar10_norms``: the CIFAR-10 normalization
study behind ``dagan benchmark cifar10``)."""

__all__ = ["cifar10_norms"]
