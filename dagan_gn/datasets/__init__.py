"""Torch datasets: HDF5 patches and same-class pairs (``patches``), real + synthetic mixing (``mixing``), CIFAR-10
(``cifar10``)."""
