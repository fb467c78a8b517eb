"""Tenant rules: blocked terms and regular expressions, validated on save and checked without I/O.

Terms match whole words, case-insensitively ("kill" matches "KILL!" but not "skill" or
"kills"); spaces inside a term match any run of whitespace. Patterns are Python regular
expressions, also case-insensitive (write `(?-i:...)` for a case-sensitive part).

Python's `re` has no timeout, so a tenant's pattern is kept from stalling a process by three
limits: a pattern is at most MAX_PATTERN_CHARS long; a pattern that nests a variable-length
quantifier in a repeated group (`(a+)+`, `(\\w+\\s?)*`: the classic catastrophic
backtracking) is refused on save; and patterns search the text in windows of
PATTERN_WINDOW_CHARS (overlapping by PATTERN_OVERLAP_CHARS, so any match up to that long is
still found), over at most MAX_PATTERN_TEXT_CHARS of text (a `$` may also match at a window's
end). Terms are our own linear regex and see the whole text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError

from llm.moderation import OMNI_CATEGORIES

MAX_TERMS = 500
MAX_TERM_CHARS = 100
MAX_PATTERNS = 50
MAX_PATTERN_CHARS = 200
PATTERN_WINDOW_CHARS = 2048
PATTERN_OVERLAP_CHARS = 256
MAX_PATTERN_TEXT_CHARS = 200_000
FLAGS = re.IGNORECASE

TERM_CATEGORY = "blocked_term"
PATTERN_CATEGORY = "blocked_pattern"


@dataclass(frozen=True)
class PolicySnapshot:
    """Everything a check needs, read in one query and compiled once: safe to share."""

    tenant_id: int
    check_input: bool
    check_output: bool
    use_provider: bool
    provider_categories: frozenset[str]
    terms: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]
    input_action: str
    output_action: str
    stream_check_sentences: bool
    notice: str
    term_regex: re.Pattern[str] | None = None

    def checks(self, direction: str) -> bool:
        return self.check_input if direction == "input" else self.check_output

    def action_for(self, direction: str) -> str:
        return self.input_action if direction == "input" else self.output_action

    @property
    def has_rules(self) -> bool:
        return self.term_regex is not None or bool(self.patterns)


@dataclass(frozen=True)
class RuleHit:
    """The first rule that matched: the term as the tenant wrote it, or the pattern's source."""

    kind: str  # "term" | "pattern"
    matched: str

    @property
    def category(self) -> str:
        return TERM_CATEGORY if self.kind == "term" else PATTERN_CATEGORY


# --- checking -----------------------------------------------------------------------------


def _normal(term: str) -> str:
    return " ".join(term.split()).casefold()


def terms_compile(terms: tuple[str, ...]) -> re.Pattern[str] | None:
    """One alternation for all terms, longest first, bounded by non-word characters."""
    if not terms:
        return None
    alternatives = [r"\s+".join(re.escape(word) for word in term.split())
                    for term in sorted(terms, key=len, reverse=True)]
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", FLAGS)


def _windows(length: int) -> Iterator[tuple[int, int]]:
    end = min(length, MAX_PATTERN_TEXT_CHARS)
    start = 0
    while True:
        yield start, min(start + PATTERN_WINDOW_CHARS, end)
        if start + PATTERN_WINDOW_CHARS >= end:
            return
        start += PATTERN_WINDOW_CHARS - PATTERN_OVERLAP_CHARS


def rules_check(*, policy: PolicySnapshot, text: str) -> RuleHit | None:
    """The first term, else the first pattern, that matches `text`. Pure: no I/O."""
    if policy.term_regex is not None:
        match = policy.term_regex.search(text)
        if match is not None:
            wanted = _normal(match.group())
            term = next((t for t in policy.terms if _normal(t) == wanted), match.group())
            return RuleHit(kind="term", matched=term)
    for pattern in policy.patterns:
        # search(text, pos, endpos) bounds the work without copying the text.
        if any(pattern.search(text, start, end) for start, end in _windows(len(text))):
            return RuleHit(kind="pattern", matched=pattern.pattern)
    return None


# --- validation (model field validators and the save service) ------------------------------


def _string_list(value: Any, *, what: str, limit: int, item_chars: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError(f"{what} must be a list of strings")
    if len(value) > limit:
        raise ValidationError(f"at most {limit} {what} are allowed")
    for item in value:
        if not item.strip():
            raise ValidationError(f"{what} must not be empty")
        if len(item) > item_chars:
            raise ValidationError(f"each of the {what} is at most {item_chars} characters")
    return value


def terms_validate(value: Any) -> None:
    _string_list(value, what="blocked terms", limit=MAX_TERMS, item_chars=MAX_TERM_CHARS)


def patterns_validate(value: Any) -> None:
    for source in _string_list(value, what="blocked patterns", limit=MAX_PATTERNS, item_chars=MAX_PATTERN_CHARS):
        try:
            re.compile(source, FLAGS)
        except re.error as error:
            raise ValidationError(f"{source!r} is not a valid regular expression: {error}") from None
        if nested_quantifier(source):
            raise ValidationError(
                f"{source!r} repeats a group that itself repeats without bound "
                "(catastrophic backtracking); rewrite it without nested quantifiers"
            )


def categories_validate(value: Any) -> None:
    _string_list(value, what="provider categories", limit=len(OMNI_CATEGORIES), item_chars=64)
    unknown = sorted(set(value) - set(OMNI_CATEGORIES))
    if unknown:
        raise ValidationError(f"unknown provider categories: {', '.join(unknown)}")


# A heuristic on the parse tree: re's parser is private, but it is the only parser that agrees
# with re on what a pattern means. Without it, only the length and window limits apply.
try:
    from re import _parser  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    _parser = None


def _repeats(op: Any) -> bool:
    names = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
    return any(op is getattr(_parser, name, None) for name in names)


def _children(value: Any) -> Iterator[Any]:
    for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, _parser.SubPattern):
            yield item
        elif isinstance(item, (tuple, list)):
            yield from _children(item)


def _nested_repeat(tree: Any, *, inside_repeat: bool) -> bool:
    """True when a variable-length repeat sits inside a repeat that may run more than once:
    the text can then be split between them in exponentially many ways. `(\\d{3}-)+` is fine
    (fixed length inside), `(a{1,2})+` and `(\\w+\\s?)+` are not."""
    for op, value in tree:
        if _repeats(op):
            low, high, sub = value
            if inside_repeat and high != low:
                return True
            if _nested_repeat(sub, inside_repeat=inside_repeat or high > 1):
                return True
            continue
        for child in _children(value):
            if _nested_repeat(child, inside_repeat=inside_repeat):
                return True
    return False


def nested_quantifier(source: str) -> bool:
    if _parser is None:  # pragma: no cover
        return False
    return _nested_repeat(_parser.parse(source, FLAGS), inside_repeat=False)
