"""Verifiers: decide whether a completion states a row's reference `answer`.

A verifier is `verifier(completion_text, answer) -> bool`, pure and cheap, so a trainer can call it
on every sample (to filter samples, route between teachers, or reward a policy). Look one up by
name with `get_verifier`.
"""

from __future__ import annotations

import re
from typing import Callable

Verifier = Callable[[str, str], bool]

_LEADING_INTEGER = re.compile(r"[+-]?\d+")


def verify_exact(completion: str, answer: str) -> bool:
    """True when the completion, stripped of surrounding whitespace, equals the stripped answer."""
    return completion.strip() == answer.strip()


def verify_integer(completion: str, answer: str) -> bool:
    """True when the integer that opens the stripped completion equals the integer `answer`.

    Text after that integer is ignored ("82 because..." states 82); a completion that does not
    open with an integer is wrong. A non-integer `answer` is a data error and raises `ValueError`.
    """
    match = _LEADING_INTEGER.match(completion.strip())
    return match is not None and int(match.group()) == int(answer.strip())


VERIFIERS: dict[str, Verifier] = {
    "exact": verify_exact,
    "integer": verify_integer,
}


def get_verifier(name: str) -> Verifier:
    """The verifier registered under `name`; `ValueError` naming the known ones otherwise."""
    try:
        return VERIFIERS[name]
    except KeyError:
        known = ", ".join(sorted(VERIFIERS))
        raise ValueError(f"unknown verifier {name!r}; choose one of: {known}") from None
