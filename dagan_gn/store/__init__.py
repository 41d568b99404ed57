"""The HDF5 patch file format (``patch_file``): the one reader and writer of patches, labels, splits and provenance."""
