"""Merge megatron indexed datasets (e.g. one per preprocessing job) into one; see docs/preprocessing.md."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lcot.data.preprocessing.cli import merge_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(merge_main())
