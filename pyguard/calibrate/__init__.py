"""Calibration and fitting: CASA (casa.py); CMRM vectors and TGA come next."""
