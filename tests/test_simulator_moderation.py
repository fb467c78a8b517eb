"""The simulator's /v1/moderations: OpenAI's shape, documented trigger words, no usage."""

from __future__ import annotations

import re

import httpx2
import openai
import pytest

import simulator
from simulator import CATEGORIES, TRIGGERS, Simulator
from tests.simserver import SimulatorServer


@pytest.fixture
def client(simulator_server: SimulatorServer, sim: Simulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=simulator_server.base_url, api_key="sk-test", max_retries=0,
                         timeout=5)


def test_a_trigger_word_flags_its_category(client: openai.OpenAI, sim: Simulator) -> None:
    response = client.moderations.create(input="Please kill the stuck process.")

    assert response.id.startswith("modr-") and response.model == "omni-moderation-latest"
    (result,) = response.results
    assert result.flagged
    assert result.categories.violence and not result.categories.hate
    assert result.category_scores.violence == 0.99 and result.category_scores.hate == 0.001
    assert result.category_applied_input_types.violence == ["text"]
    assert sim.stats.moderations == 1 and sim.stats.requests == 0
    assert sim.moderation_requests[-1]["input"] == "Please kill the stuck process."


def test_text_without_a_trigger_is_not_flagged(client: openai.OpenAI) -> None:
    (result,) = client.moderations.create(input="A skilled killer-whale watcher.").results

    assert not result.flagged
    assert set(result.category_scores.model_dump().values()) == {0.001}


def test_a_list_of_strings_gets_one_result_each(client: openai.OpenAI) -> None:
    response = client.moderations.create(
        input=["hello", "HATE-WORD here", "threaten-word"], model="omni-moderation-2024-09-26")

    assert response.model == "omni-moderation-2024-09-26"
    flags = [(r.flagged, r.categories.hate, r.categories.harassment,
              r.categories.harassment_threatening) for r in response.results]
    assert flags == [(False, False, False, False), (True, True, False, False),
                     (True, False, True, True)]


def test_every_documented_trigger_flags_known_categories(client: openai.OpenAI) -> None:
    response = client.moderations.create(input=list(TRIGGERS))

    for word, result in zip(TRIGGERS, response.results, strict=True):
        flagged = {c for c, on in result.categories.model_dump(by_alias=True).items() if on}
        assert flagged == set(TRIGGERS[word]) and flagged <= set(CATEGORIES)


def test_the_documented_table_is_the_one_applied() -> None:
    section = (simulator.__doc__ or "").split("\nModeration\n")[1].split("\nDirectives in")[0]
    rows = re.findall(r"^(``\S.*?``)\s{2,}(\S.*)$", section, re.MULTILINE)
    documented = {word: tuple(categories.split(", ")) for words, categories in rows
                  for word in re.findall(r"``(.+?)``", words)}

    assert documented == TRIGGERS


def test_image_parts_apply_only_to_image_categories(client: openai.OpenAI) -> None:
    response = client.moderations.create(input=[
        {"type": "text", "text": "gore-word"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}])

    (result,) = response.results
    assert result.categories.violence_graphic and result.categories.violence
    assert result.category_applied_input_types.violence == ["text", "image"]
    assert result.category_applied_input_types.hate == ["text"]


def test_the_response_carries_no_usage(simulator_server: SimulatorServer, sim: Simulator) -> None:
    response = httpx2.post(f"{simulator_server.base_url}/moderations", json={"input": "hi"},
                           headers={"Authorization": "Bearer sk-test"})

    assert response.status_code == 200 and response.headers["x-request-id"]
    assert set(response.json()) == {"id", "model", "results"}
    recorded = httpx2.get(f"{simulator_server.url}/sim/moderations").json()
    assert recorded == [{"input": "hi"}]


def test_moderation_needs_a_bearer_and_an_input(
    simulator_server: SimulatorServer, client: openai.OpenAI, sim: Simulator,
) -> None:
    anonymous = httpx2.post(f"{simulator_server.base_url}/moderations", json={"input": "hi"})
    assert anonymous.status_code == 401
    with pytest.raises(openai.BadRequestError) as caught:
        client.moderations.create(input=[])
    assert caught.value.param == "input"
    assert sim.stats.moderations == 2


def test_injected_moderation_faults(client: openai.OpenAI, sim: Simulator) -> None:
    sim.inject_moderation(status=503, retry_after=1)

    with pytest.raises(openai.InternalServerError) as caught:
        client.moderations.create(input="hello")
    assert caught.value.response.headers["retry-after"] == "1"
    assert not client.moderations.create(input="hello").results[0].flagged
    # Directives in the text are for the chat call it precedes, not for the moderation.
    assert client.moderations.create(input="hi [[sim:status=500]]").results[0].flagged is False


def test_an_injected_hang_ends_in_a_client_timeout(
    simulator_server: SimulatorServer, sim: Simulator,
) -> None:
    sim.inject_moderation(hang=True)
    client = openai.OpenAI(base_url=simulator_server.base_url, api_key="sk-test", max_retries=0,
                           timeout=0.3)

    with pytest.raises(openai.APITimeoutError):
        client.moderations.create(input="hello")
