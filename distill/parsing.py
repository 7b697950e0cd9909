"""Parsing of the few value formats every verb shares; errors are `UserError`s that name the expected format.

One convention for image sizes across the whole tool: HEIGHTxWIDTH (rows x columns), as numpy and torch index.
"""

from __future__ import annotations

import argparse

from distill.errors import UserError

SIZE_FORMAT = "HEIGHTxWIDTH"
# A height more than twice the width is taken for a swapped WIDTHxHEIGHT (1242x375 for KITTI's 375x1242): no
# camera our users run is that tall, while portrait sensors (e.g. 1920x1080 upright) stay accepted.
SWAPPED_RATIO = 2.0


def parse_size(text: str) -> tuple[int, int]:
    """ "375x1242" -> (375, 1242), i.e. (height, width) in pixels.

    Raises:
        UserError: not two positive integers joined by "x", or a value that looks like WIDTHxHEIGHT (the message
            names the convention and the swapped value).
    """
    try:
        height, width = (int(part) for part in str(text).lower().split("x"))
    except ValueError:
        raise UserError(f"size must be {SIZE_FORMAT} in pixels, e.g. 352x1216; got {text!r}") from None
    if height <= 0 or width <= 0:
        raise UserError(f"size must be positive {SIZE_FORMAT}, got {text!r}")
    if height > SWAPPED_RATIO * width:
        raise UserError(
            f"size {text!r} would be {height} rows by {width} columns; sizes are {SIZE_FORMAT}: did you mean "
            f"{width}x{height}?"
        )
    return height, width


def size_argument(text: str) -> tuple[int, int]:
    """`parse_size` as an argparse `type=`: mistakes become argparse's one-line usage errors."""
    try:
        return parse_size(text)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
