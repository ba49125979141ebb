"""Tokenize text corpora into megatron indexed datasets; see docs/preprocessing.md.

    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \
        --json-keys text --append-eod --workers 16
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lcot.data.preprocessing.cli import preprocess_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(preprocess_main())
