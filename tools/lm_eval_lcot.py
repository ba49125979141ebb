"""lm-eval's own command line with our checkpoints registered as the model `lcot`.

    python tools/lm_eval_lcot.py --model lcot --model_args load=CKPT_DIR --tasks TASK [TASK ...] \
        [--include_path DIR] [--limit N] [--output_path DIR] [any other lm_eval option]

lm-eval 0.4.13 has no plugin mechanism (its registry knows only its own models), so the
`lm_eval` console script cannot load `lcot`: this launcher imports
`megatron_lcot.inference.lm_eval_adapter` (which registers it) and runs lm-eval's CLI on the same
arguments. model_args and which tokens are scored: docs/hf.md ("lm-eval"). A bad `--model_args`
for lcot prints `lm_eval_lcot.py: error: ...` and exits 2 before any task is loaded.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list | None = None) -> None:
    from lm_eval.utils import setup_logging

    from megatron_lcot.compat import lm_eval_cli
    from megatron_lcot.inference.lm_eval_adapter import ModelArgsError, checkpoint_dir
    from megatron_lcot.inference.loading import USER_ERRORS

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]  # HarnessCLI reads sys.argv
    setup_logging()
    parser = lm_eval_cli()()
    args = parser.parse_args()
    try:
        if getattr(args, "model", None) == "lcot":
            checkpoint_dir(args.model_args)
        parser.execute(args)
    except (ModelArgsError, *USER_ERRORS) as error:
        print(f"lm_eval_lcot.py: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
