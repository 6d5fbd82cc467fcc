"""The scale bank (docs/ARCHITECTURE.md): on-disk format, validation, and the bucket selection policy."""

from .bank import MANIFEST, Bank, model_info
from .buckets import bucket_name, parse_buckets, parse_length
from .errors import BankError, UnknownBucketError
from .manifest import CHOICES, FORMAT_VERSION, GRANULARITIES, METHODS, TENSOR_METHODS, BankEntry, BankManifest
from .selection import NONE, Selection, select

__all__ = [
    "CHOICES", "FORMAT_VERSION", "GRANULARITIES", "MANIFEST", "METHODS", "NONE", "TENSOR_METHODS", "Bank",
    "BankEntry", "BankError", "BankManifest", "Selection", "UnknownBucketError", "bucket_name", "model_info",
    "parse_buckets", "parse_length", "select",
]
