"""From DICOM files to patch candidates: decoding (``dicom``), breast mask (``mask``), patch centres (``sampling``),
the lesion labels CSV (``labels``) and de-identification (``privacy``). The ``extract-patches`` job that strings them
together is :mod:`dagan_gn.jobs.extract_patches`."""
