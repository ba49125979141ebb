"""Train a sentencepiece or byte-level BPE tokenizer on a sample of a corpus; see docs/preprocessing.md."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lcot.data.preprocessing.cli import train_tokenizer_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_tokenizer_main())
