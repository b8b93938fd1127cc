"""lm-eval's own command line with the `fashionfuse` model registered (lm-eval's CLI does not
discover plugin models, so this imports ours, then hands every argument to lm-eval):

    python -m fashionfuse.evaluate.lm_eval_cli --model fashionfuse \\
        --model_args pretrained=BASE,peft=RUN/search/fused --tasks arc_challenge ...

(also installed as the `fashionfuse-lm-eval` command). Every other lm-eval model and option
works as in `lm_eval`.
"""

from __future__ import annotations


def main() -> None:
    """Register `fashionfuse` in lm-eval's model registry, then run lm-eval's CLI. A problem
    with the model arguments is one line and exit 2, as in `fashionfuse`."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_model  # noqa: F401  (registers the model)
    from ..errors import UserError

    try:
        cli_evaluate()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
