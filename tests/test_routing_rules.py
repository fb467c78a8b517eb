"""Routes: their validation and the pure choice of a model (routing/rules.py)."""

from __future__ import annotations

import pytest

from routing.rules import GradeNeeded, RoutesInvalid, choose, pattern_matches, routes_validate

ROUTES = [
    {"name": "refunds", "model": "gpt-3.5-turbo", "when": {"pattern": "(?i)refund|price"}},
    {"name": "short", "model": "gpt-4o-mini", "when": {"max_input_tokens": 200, "tools": False, "max_depth": 2}},
    {"name": "late", "model": "gpt-4-turbo", "when": {"min_depth": 5}},
]


def _choose(routes=ROUTES, **facts):
    defaults = {"question": "hello", "input_tokens": 50, "tools_needed": False, "depth": 1}
    return choose(routes, "gpt-4o", **{**defaults, **facts})


def test_first_matching_route_wins_and_the_default_answers_otherwise():
    assert (_choose().model, _choose().route_name) == ("gpt-4o-mini", "short")
    assert _choose(question="Can I get a REFUND?").route_name == "refunds"  # earlier route first
    fallback = _choose(input_tokens=500)
    assert (fallback.model, fallback.route_name, fallback.routed) == ("gpt-4o", "", False)


def test_every_condition_of_a_route_must_hold():
    assert _choose(tools_needed=True).model == "gpt-4o"  # "tools": false
    assert _choose(depth=3).model == "gpt-4o"  # max_depth 2
    assert _choose(depth=5, input_tokens=999).route_name == "late"  # min_depth 5


def test_an_unusable_model_passes_the_route_over():
    choice = _choose(usable=lambda model: model != "gpt-4o-mini")
    assert choice.model == "gpt-4o"


def test_a_classifier_route_asks_for_its_grade_then_uses_it():
    routes = [{"name": "graded", "model": "gpt-4o-mini",
               "when": {"classifier": {"model": "gpt-4o-mini", "label": "simple"}}}]
    with pytest.raises(GradeNeeded) as needed:
        _choose(routes)
    assert (needed.value.model, needed.value.route) == ("gpt-4o-mini", "graded")
    assert _choose(routes, grades={"gpt-4o-mini": "simple"}).route_name == "graded"
    assert _choose(routes, grades={"gpt-4o-mini": "complex"}).model == "gpt-4o"
    assert _choose(routes, grades={"gpt-4o-mini": None}).model == "gpt-4o"  # grading failed: fail open


def test_static_conditions_are_checked_before_a_classifier_is_asked():
    routes = [{"name": "graded", "model": "gpt-4o-mini",
               "when": {"max_input_tokens": 10, "classifier": {"model": "gpt-4o-mini", "label": "simple"}}}]
    assert _choose(routes, input_tokens=11).model == "gpt-4o"  # no GradeNeeded


def test_valid_routes_pass_unchanged():
    assert routes_validate(ROUTES) == ROUTES
    assert routes_validate([]) == [] and routes_validate(None) == []


@pytest.mark.parametrize(("routes", "says"), [
    ({"name": "x"}, "routes: {'name': 'x'} is not of type 'array'"),
    ([{"model": "gpt-4o"}], "routes[0]: 'name' is a required property"),
    ([{"name": "a", "model": "gpt-4o", "when": {"max_tokens": 5}}], "routes[0].when: Additional properties"),
    ([{"name": "a", "model": "gpt-4o", "when": {"tools": "yes"}}], "routes[0].when.tools: 'yes' is not of type 'boolean'"),
    ([{"name": "a", "model": "gpt-4o", "when": {"pattern": "(unclosed"}}], "routes[0].when.pattern: not a valid regular"),
    ([{"name": "a", "model": "gpt-4o", "when": {"pattern": "x" * 201}}], "routes[0].when.pattern: 'xxx"),
    ([{"name": "a", "model": "m"}, {"name": "a", "model": "m"}], "routes[1].name: 'a' is used by an earlier route"),
    ([{"name": "a", "model": "m", "when": {"min_depth": 3, "max_depth": 1}}], "min_depth is greater than max_depth"),
    ([{"name": "a", "model": "m", "when": {"classifier": {"model": "m", "label": "hard"}}}],
     "routes[0].when.classifier.label: 'hard' is not one of ['simple', 'complex']"),
    ([{"name": "a", "model": "m"}] * 17, "is too long"),
])
def test_invalid_routes_are_refused_saying_where_and_why(routes, says):
    with pytest.raises(RoutesInvalid) as refused:
        routes_validate(routes)
    assert says in str(refused.value)


def test_a_catastrophic_pattern_times_out_as_no_match():
    assert pattern_matches(r"(?:(?:x+x+)+y|(\w+\s?)+\d)$", "x" * 5000) is False
    assert pattern_matches("(?i)refund", "I want a Refund") is True
    # Only the start of a long question is searched.
    assert pattern_matches("needle", "x" * 5000 + "needle") is False
