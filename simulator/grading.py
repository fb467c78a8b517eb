"""Grading prompts: a request whose system message asks for one word, simple or complex, gets it.

Parley's classifier routes send such a prompt (routing/grading.py); the simulator answers it
deterministically so tests and benchmarks can rely on the grade: ``complex`` when the question
(the last user message) has more than ``SIMPLE_MAX_WORDS`` words or contains one of the
``COMPLEX_MARKERS``, ``simple`` otherwise.
"""

from __future__ import annotations

from .request import ParsedRequest, message_text

ASK = "answer with one word: simple or complex"
SIMPLE_MAX_WORDS = 25
COMPLEX_MARKERS = ("explain", "why", "compare", "design", "analyse", "analyze", "step by step")


def grading_head(request: ParsedRequest) -> list[str] | None:
    """The one-word grade, when the request is a grading prompt; None otherwise."""
    system = " ".join(message_text(m) for m in request.messages if m.get("role") in ("system", "developer"))
    if ASK not in system.lower():
        return None
    question = request.echo.lower()
    complex_ = len(question.split()) > SIMPLE_MAX_WORDS or any(marker in question for marker in COMPLEX_MARKERS)
    return ["complex" if complex_ else "simple"]
