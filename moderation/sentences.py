"""Cut streamed output into sentences, so a policy can check each one as it completes."""

from __future__ import annotations

import re

# A sentence ends at . ! or ? (a run of them, and closing quotes or brackets) followed by
# whitespace, or at a newline. Punctuation not yet followed by anything waits for the next
# delta: "3." may become "3.14".
_END = re.compile(r"[.!?]+[\"')\]]*\s+|\n+")


class SentenceSplitter:
    """Feed deltas, get back complete sentences; `flush()` the rest when the stream ends.

    Sentences keep their trailing whitespace, so the sentences and the flushed rest, joined,
    are exactly the text fed. A run of MAX_CHARS without an end (a code block, a list without
    full stops) is released at its last space, so neither the check nor the buffer waits forever.
    """

    MAX_CHARS = 1000

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, delta: str) -> list[str]:
        self._buffer += delta
        sentences: list[str] = []
        while True:
            match = _END.search(self._buffer)
            if match is not None:
                cut = match.end()
            elif len(self._buffer) > self.MAX_CHARS:
                space = self._buffer.rfind(" ", 0, self.MAX_CHARS)
                cut = space + 1 if space > 0 else self.MAX_CHARS
            else:
                return sentences
            sentences.append(self._buffer[:cut])
            self._buffer = self._buffer[cut:]

    def flush(self) -> str:
        """What is left (possibly ""): the last sentence, when the answer did not end with one."""
        rest, self._buffer = self._buffer, ""
        return rest
