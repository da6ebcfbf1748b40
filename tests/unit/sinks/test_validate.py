"""Field rules: parse_number's reading of human-formatted numbers, the rules per type, checks by name."""

from __future__ import annotations

from typing import Any

import pytest

from sinks.validate import RecordValidator, parse_number, register_check, resolve_check
from trawl.config import ApiField, HtmlField
from trawl.errors import LoadError


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("1,299.00", 1299.0),
        ("$ 1 299,5", 1299.5),
        ("1.299.000", 1299000.0),
        ("1.299,5 €", 1299.5),
        ("EUR 12.50", 12.5),
        ("1,5", 1.5),
        ("1,299", 1299.0),
        ("-3.5", -3.5),
        ("12\u00a0000", 12000.0),
        ("1'234.5", 1234.5),
    ],
)
def test_parse_number_reads_human_formats(text: str, number: float) -> None:
    assert parse_number(text) == number


@pytest.mark.parametrize("text", ["abc", "1,2,3", "1.2.3", "", "--1"])
def test_parse_number_refuses_what_is_not_a_number(text: str) -> None:
    with pytest.raises(ValueError, match="not a number"):
        parse_number(text)


def validate(spec: dict[str, Any], value: Any) -> tuple[Any, list[str]]:
    [v], reasons = RecordValidator({"f": spec})({"f": value})
    return v, reasons


def test_rules_pass_and_fail_with_reasons() -> None:
    assert validate({"type": "float", "parse": "number", "min": 0}, "1,299.00") == (1299.0, [])
    assert validate({"type": "float"}, "1,299.00")[1] == ["f: expected float, got '1,299.00'"]
    assert validate({"type": "int", "max": 10}, 11)[1] == ["f: 11 is more than max 10"]
    assert validate({"type": "text", "pattern": "^a"}, "ba")[1] == ["f: 'ba' does not match '^a'"]
    assert validate({"type": "text", "max_length": 2}, "abc")[1] == ["f: 3 characters, more than max_length 2"]
    assert validate({"type": "bool", "choices": [True]}, "no")[1] == ["f: False is not one of [True]"]
    assert validate({"type": "text", "required": True}, None)[1] == ["f: required but missing"]
    assert validate({"type": "text", "choices": ["a"]}, None) == (None, [])  # rules apply to present values


def test_custom_checks_by_registered_name_only() -> None:
    @register_check("unit_short")
    def short(value: Any, data: Any) -> str | None:
        return None if len(value) < 3 else "too long"

    @register_check("unit_broken")
    def broken(value: Any, data: Any) -> None:
        raise TypeError("bug")

    assert resolve_check("unit_short") is short
    assert validate({"type": "text", "checks": ["unit_short"]}, "abcd")[1] == ["f: too long (check unit_short)"]
    assert validate({"type": "text", "checks": ["http_url"]}, "x")[1] == ["f: not an http(s) URL: 'x' (check http_url)"]
    with pytest.raises(LoadError, match=r"field 'f': check unit_broken raised TypeError"):
        validate({"type": "text", "checks": ["unit_broken"]}, "rel")
    with pytest.raises(LoadError, match="field 'f': no check registered as 'missing'"):
        RecordValidator({"f": {"type": "text", "checks": ["missing"]}})
    # An import path is a name like any other: nothing registered it, so nothing is imported.
    for path in ("builtins:exec", "os.path:isabs", "sinks.validate:_http_url"):
        with pytest.raises(LoadError, match=f"field 'f': no check registered as '{path}'"):
            RecordValidator({"f": {"type": "text", "checks": [path]}})


def test_field_models_carry_rules_into_the_manifest_and_refuse_misfits() -> None:
    field = HtmlField(selector=".p", type="float", parse="number", min=0, max=10)
    assert field.loader_spec() == {"type": "float", "required": False, "parse": "number", "min": 0.0, "max": 10.0}
    assert ApiField().loader_spec() == {"type": "text", "required": False}
    for bad, message in [
        ({"type": "text", "min": 1}, "`min`/`max` apply to int and float fields, not text"),
        ({"type": "int", "min": 2, "max": 1}, "`min` (2.0) is greater than `max` (1.0)"),
        ({"type": "text", "parse": "number"}, "`parse: number` applies to int and float fields, not text"),
        ({"type": "int", "pattern": "x"}, "`pattern`/`max_length` apply to text fields, not int"),
        ({"pattern": "("}, "invalid regular expression"),
        ({"checks": ["bad name!"]}, "check name 'bad name!' must match"),
        ({"checks": ["builtins:exec"]}, "`module:function` paths are not accepted"),
        ({"checks": ["ok\n"]}, "check name 'ok.{2}' must match"),  # a trailing newline is refused
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("`", ".")):
            ApiField(**bad)
