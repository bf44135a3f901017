"""Address normalisation, as the contract defines it (guarantee 2).

Two addresses are the same address when they are equal after trimming surrounding whitespace and
lower-casing the ASCII letters ``A``–``Z``. Nothing else is folded: ``str.lower()`` would turn
U+212A KELVIN SIGN into ASCII ``k`` (and U+0130 into ``i̇``), so an exit for ``\\u212aate@…``
would remove ``kate@…``, another person. Whether two Unicode spellings are one mailbox is the
mail server's business, not ours.
"""

from __future__ import annotations

from typing import Final

__all__ = ["normalise_address"]

_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def normalise_address(address: str) -> str:
    """``address`` trimmed, with its ASCII letters lower-cased and every other character kept.

    Idempotent. Does not judge whether it is a plausible address (``events.parse_email`` does).
    """
    address = address.strip()
    # For ASCII text str.lower() is exactly the ASCII mapping, and much faster than translate.
    return address.lower() if address.isascii() else address.translate(_ASCII_LOWER)
