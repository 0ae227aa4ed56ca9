import math

import pytest

from protocol.errors import ProtocolError
from protocol.sampling import parse_sampling

FLOAT_FIELDS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]
BAD_INTS = [1.5, "10", True, False, 10**30, 2**64, -(2**64), math.nan, math.inf, [1], {"a": 1}, "abc"]
INT_FIELDS = ["top_k", "seed", "min_tokens", "n", "max_tokens", "max_completion_tokens", "max_new_tokens"]


def error_of(body, **kw) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_sampling(body, **kw)
    err = info.value
    assert err.status == 400
    return err


def assert_names(err: ProtocolError, field: str):
    assert err.param == field
    assert field in err.message


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400, "0.5", True, False, [0.5], {"v": 1}])
def test_float_fields_reject_bad_values(field, value):
    assert_names(error_of({field: value}), field)


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", BAD_INTS)
def test_int_fields_reject_bad_values(field, value):
    assert_names(error_of({field: value}), field)


@pytest.mark.parametrize("body,field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": 101}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"min_p": 2}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"top_k": -2}, "top_k"),
    ({"n": 0}, "n"), ({"n": 9}, "n"), ({"n": 10**6}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"stop": ["x"] * 9}, "stop"), ({"stop": ["a" * 257]}, "stop"), ({"stop": [""]}, "stop"),
    ({"stop": [1]}, "stop"), ({"stop": 5}, "stop"), ({"stop": {"a": 1}}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_token_ids": 3}, "stop_token_ids"),
    ({"stop_token_ids": [1.5]}, "stop_token_ids"), ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
    ({"seed": 2**64}, "seed"), ({"ignore_eos": 1}, "ignore_eos"), ({"do_sample": "no"}, "do_sample"),
    ({"logprobs": 1}, "logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": 10, "max_completion_tokens": 11}, "max_completion_tokens"),
    ({"max_tokens": 10, "max_new_tokens": 12}, "max_new_tokens"),
])
def test_range_and_shape_errors_name_the_field(body, field):
    assert_names(error_of(body), field)


@pytest.mark.parametrize("value", [-1, 21, True, 1.5, "2"])
def test_completion_logprobs_int(value):
    assert_names(error_of({"logprobs": value}, completion=True), "logprobs")


def test_defaults_and_values():
    p = parse_sampling({})
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.n, p.stop) == (1.0, 1.0, 0, None, 1, ())
    p = parse_sampling({"temperature": 0, "top_p": 0.5, "top_k": 40, "min_p": 0.1, "seed": -5, "stop": "###",
                        "stop_token_ids": [2, 3], "max_completion_tokens": 2048.0, "min_tokens": 3,
                        "presence_penalty": 1, "frequency_penalty": -1, "repetition_penalty": 1.1,
                        "n": 2, "ignore_eos": True, "logprobs": True, "top_logprobs": 5})
    assert p.is_greedy and p.top_p == 0.5 and p.top_k == 40 and p.seed == -5
    assert p.stop == ("###",) and p.stop_token_ids == (2, 3)
    assert p.max_tokens == 2048 and isinstance(p.max_tokens, int) and p.min_tokens == 3
    assert (p.n, p.ignore_eos, p.logprobs, p.top_logprobs) == (2, True, True, 5)
    assert isinstance(p.temperature, float)


def test_top_k_minus_one_means_off():
    assert parse_sampling({"top_k": -1}).top_k == 0
    assert parse_sampling({"top_k": 0}).top_k == 0


def test_do_sample_false_is_greedy():
    assert parse_sampling({"do_sample": False, "temperature": 0.7}).temperature == 0.0
    assert parse_sampling({"do_sample": True, "temperature": 0.7}).temperature == 0.7


def test_max_tokens_aliases_agree():
    assert parse_sampling({"max_tokens": 7, "max_new_tokens": 7}).max_tokens == 7
    assert parse_sampling({"max_new_tokens": 9}).max_tokens == 9


def test_route_defaults_apply_only_when_absent():
    eas = {"temperature": 0.95, "top_k": 30, "top_p": 0.8, "max_new_tokens": 2048}
    p = parse_sampling({}, defaults=eas)
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.95, 30, 0.8, 2048)
    p = parse_sampling({"temperature": 0.1, "max_tokens": 5, "top_k": None}, defaults=eas)
    assert (p.temperature, p.top_k, p.max_tokens) == (0.1, 30, 5)


def test_null_means_absent():
    p = parse_sampling({"temperature": None, "stop": None, "max_tokens": None, "logprobs": None, "seed": None})
    assert p.temperature == 1.0 and p.stop == () and p.max_tokens is None and p.seed is None


def test_completion_logprobs_k():
    p = parse_sampling({"logprobs": 3}, completion=True)
    assert p.logprobs and p.top_logprobs == 3
    p = parse_sampling({"logprobs": 0}, completion=True)
    assert p.logprobs and p.top_logprobs == 0
    assert not parse_sampling({}, completion=True).logprobs


def test_stop_metacharacters_are_literal():
    assert parse_sampling({"stop": [".*", "(a|b)"]}).stop == (".*", "(a|b)")
