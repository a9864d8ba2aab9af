"""Verifiers: decide whether a completion states a row's reference `answer`.

A verifier is `verifier(completion_text, answer) -> bool`, pure and cheap, so a trainer can call it
on every sample (to filter samples, route between teachers, or reward a policy). Look one up by
name with `get_verifier`; `ANSWER_EXTRACTORS` holds, under the same names, what each one reads
as the completion's answer.
"""

from __future__ import annotations

import re
from typing import Callable

Verifier = Callable[[str, str], bool]

_LEADING_INTEGER = re.compile(r"[+-]?\d+")


def extract_exact(completion: str) -> str:
    """The answer a completion states: the whole completion, stripped of surrounding whitespace."""
    return completion.strip()


def extract_integer(completion: str) -> int | None:
    """The integer that opens the stripped completion ("082 because..." states 82), or None."""
    match = _LEADING_INTEGER.match(completion.strip())
    return int(match.group()) if match else None


def verify_exact(completion: str, answer: str) -> bool:
    """True when the completion, stripped of surrounding whitespace, equals the stripped answer."""
    return extract_exact(completion) == answer.strip()


def verify_integer(completion: str, answer: str) -> bool:
    """True when the integer that opens the stripped completion equals the integer `answer`.

    Text after that integer is ignored ("82 because..." states 82); a completion that does not
    open with an integer is wrong. A non-integer `answer` is a data error and raises `ValueError`.
    """
    stated = extract_integer(completion)
    return stated is not None and stated == int(answer.strip())


VERIFIERS: dict[str, Verifier] = {
    "exact": verify_exact,
    "integer": verify_integer,
}

# The answer each verifier compares, read from a completion (None: it states none), so samples
# can be grouped by the answer they state (majority voting) without a reference answer.
ANSWER_EXTRACTORS: dict[str, Callable[[str], object]] = {
    "exact": extract_exact,
    "integer": extract_integer,
}


def get_verifier(name: str) -> Verifier:
    """The verifier registered under `name`; `ValueError` naming the known ones otherwise."""
    try:
        return VERIFIERS[name]
    except KeyError:
        known = ", ".join(sorted(VERIFIERS))
        raise ValueError(f"unknown verifier {name!r}; choose one of: {known}") from None
