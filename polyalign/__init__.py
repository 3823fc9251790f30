"""polyalign: Okapi-style multilingual instruction tuning and RLHF as a resumable DAG."""

__version__ = "0.1.0"
