"""The simulator's `/v1/embeddings` over real HTTP with the official SDK, and the cache's keys:
paraphrases close, unrelated questions far, the same text always the same vector."""

from __future__ import annotations

import openai
import pytest

from llm.embeddings import provider_embed
from llm.gateway import ProviderTarget, UpstreamError
from responsecache.keys import question_normalised, request_key, similarity, vector_pack, vector_unpack
from simulator.embeddings import DIMENSIONS, embed


def _client(simulator_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=simulator_server.base_url, api_key="sk-test", max_retries=0)


def test_the_sdk_gets_unit_vectors_in_either_encoding(simulator_server, sim):
    client = _client(simulator_server)
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    default = client.embeddings.create(model="text-embedding-3-small", input=["reset my password", "opening hours"])
    floats = client.embeddings.create(model="text-embedding-3-small", input="reset my password",
                                      encoding_format="float")

    assert [len(d.embedding) for d in default.data] == [DIMENSIONS, DIMENSIONS]
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert sum(x * x for x in floats.data[0].embedding) == pytest.approx(1.0)
    assert default.usage.prompt_tokens > 0 and default.model == "text-embedding-3-small"
    assert sim.stats.embeddings == 2


def test_bad_requests_are_refused_like_openai(simulator_server, sim):
    client = _client(simulator_server)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="text-embedding-3-small", input=[], encoding_format="float")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="text-embedding-3-small", input="x", dimensions=0)


def _cos(a: str, b: str) -> float:
    return sum(x * y for x, y in zip(embed(a), embed(b), strict=True))


def test_paraphrases_are_close_and_unrelated_questions_far():
    faq = "How do I reset my password?"
    assert embed(faq) == embed(faq)
    assert _cos(faq, "how can I reset my passwords, please") > 0.99
    assert 0.6 < _cos(faq, "I forgot my password, how do I reset it?") < 0.9
    for unrelated in ("What are your opening hours on Sunday?", "Do you ship to Canada?", "Cancel my order"):
        assert abs(_cos(faq, unrelated)) < 0.3, unrelated


async def test_the_gateway_embeds_through_a_credential(simulator_server, sim):
    target = ProviderTarget(credential_id=1, base_url=simulator_server.base_url, api_key="sk-test")
    embedding = await provider_embed(target=target, model="text-embedding-3-small", text="reset my password")
    assert len(embedding.vector) == DIMENSIONS and embedding.prompt_tokens > 0
    assert sum(x * x for x in embedding.vector) == pytest.approx(1.0)
    nowhere = ProviderTarget(credential_id=2, base_url=f"{simulator_server.url}/nowhere", api_key="sk-test")
    with pytest.raises(UpstreamError) as refused:
        await provider_embed(target=nowhere, model="text-embedding-3-small", text="x")
    assert refused.value.status == 404


def test_questions_normalise_and_requests_key_without_delivery_fields():
    assert question_normalised("  What's   the PRICE?! ") == "whats the price"
    assert question_normalised("Où est-ce ?") == "où estce"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    assert request_key(body) == request_key({**body, "user": "u", "stream": True, "stream_options": {}})
    assert request_key(body) != request_key({**body, "temperature": 0.5})
    vector = tuple(embed("reset my password"))
    assert similarity(vector, vector_unpack(vector_pack(vector))) == pytest.approx(1.0, abs=1e-6)
    assert similarity(vector, vector[:10]) == 0.0
