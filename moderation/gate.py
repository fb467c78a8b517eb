"""The output gate: an answer checked against the tenant's output policy, whole or sentence by sentence.

One implementation for every surface that streams an answer: the chat engine publishes each
sentence once it has passed, `/v1` holds relayed events back until the text they carry has
passed. After a blocked sentence nothing more passes; the blocked sentence is kept for review.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from billing.caps import Subject
from llm.gateway import ProviderTarget

from .rules import PolicySnapshot
from .sentences import SentenceSplitter
from .services import ModerationContext, moderate


@dataclass
class OutputGate:
    policy: PolicySnapshot | None
    target: ProviderTarget | None
    subject: Subject
    context: ModerationContext = field(default_factory=ModerationContext)
    blocked_sentence: str | None = None  # the sentence that stopped the stream
    _splitter: SentenceSplitter = field(default_factory=SentenceSplitter)

    @property
    def by_sentence(self) -> bool:
        """The policy checks a streamed answer a sentence at a time, each held back until it passes."""
        policy = self.policy
        return policy is not None and policy.check_output and policy.stream_check_sentences

    @property
    def blocked(self) -> bool:
        return self.blocked_sentence is not None

    async def blocks(self, text: str) -> bool:
        """Whether the policy blocks this text (a whole answer, or one sentence)."""
        verdict = await moderate(
            policy=self.policy, direction="output", text=text, target=self.target, subject=self.subject,
            context=self.context,
        )
        return verdict.blocked

    async def passed(self, delta: str) -> AsyncIterator[str]:
        """Each sentence the delta completes, once it has passed; stops at a blocked one."""
        if self.blocked:
            return
        for sentence in self._splitter.feed(delta):
            if not await self._passes(sentence):
                return
            yield sentence

    async def rest(self) -> str:
        """The stream ended: the last, unfinished sentence if it passes, else ""."""
        rest = self._splitter.flush()
        if self.blocked or not rest or not await self._passes(rest):
            return ""
        return rest

    async def _passes(self, sentence: str) -> bool:
        if await self.blocks(sentence):
            self.blocked_sentence = sentence
            return False
        return True
