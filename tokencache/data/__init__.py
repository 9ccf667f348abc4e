"""Data: the digits testbed and the ADM sample npz format (reference batches: tokencache.metrics.reference)."""
from tokencache.data.digits import DigitsSplit, load_digits_dataset, digits_to_uint8

__all__ = ["DigitsSplit", "load_digits_dataset", "digits_to_uint8"]
