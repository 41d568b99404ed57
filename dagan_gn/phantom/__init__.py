"""Phantom data for the demo and the tests: synthetic DICOM mammograms (``mammogram``). Not to be confused with
*synthetic patches*, which in this project always means DAGAN output."""
