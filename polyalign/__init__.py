"""polyalign: Okapi-style multilingual instruction tuning and RLHF as a resumable DAG."""

import logging as _logging

__version__ = "0.1.0"

# peft imports bitsandbytes whenever it is installed; on a CPU with AVX512-BF16 its import
# warns that an optional Hub kernel is missing (it falls back to its own), on every command
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
