"""dagan-gn: conditional DAGAN data augmentation for mammography, with a GAN normalization study.

Subpackages by role: ``data`` (DICOM → HDF5 patches, datasets), ``modules`` (norm registry, blocks), ``nets``
(DAGAN, CIFAR-10 GANs), ``training`` (losses, trainer, checkpoints), ``metrics`` (FID/KID/IS, reconstruction,
memorization, downstream classifier), ``augment`` and ``cli``.
"""

import os as _os

# albumentations phones PyPI on import; hospitals run behind firewalls, so never let it try.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
