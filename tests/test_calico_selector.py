"""The Calico selector parser: exact trees for valid text, exact positions for faults, round trips."""

from __future__ import annotations

import pickle
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egresscore.errors import EgressCoreError
from egresscore.policy.calico_selector import MAX_NESTING, SelectorSyntaxError, parse_calico_selector
from egresscore.policy.selector import (
    MATCH_ALL,
    And,
    HasLabel,
    LabelIn,
    LabelMatch,
    MatchOp,
    Not,
    Or,
    Selector,
)

# -- building expected trees ------------------------------------------------------------


def eq(key: str, value: str) -> Selector:
    return LabelIn(key, frozenset({value}))


def ne(key: str, value: str) -> Selector:
    return Not(eq(key, value))


def within(key: str, *values: str) -> Selector:
    return LabelIn(key, frozenset(values))


def not_within(key: str, *values: str) -> Selector:
    return Not(within(key, *values))


def has(key: str) -> Selector:
    return HasLabel(key)


def starts(key: str, operand: str) -> Selector:
    return LabelMatch(key, MatchOp.STARTS_WITH, operand)


def ends(key: str, operand: str) -> Selector:
    return LabelMatch(key, MatchOp.ENDS_WITH, operand)


def contains(key: str, operand: str) -> Selector:
    return LabelMatch(key, MatchOp.CONTAINS, operand)


def all_of(*operands: Selector) -> Selector:
    return And(operands)


def any_of(*operands: Selector) -> Selector:
    return Or(operands)


A, B, C, D = eq("a", "1"), eq("b", "2"), eq("c", "3"), eq("d", "4")

# -- valid text -------------------------------------------------------------------------

VALID: list[tuple[str, Selector]] = [
    # empty text and all()
    ("", MATCH_ALL),
    ("   ", MATCH_ALL),
    ("\t\n \r", MATCH_ALL),
    ("all()", MATCH_ALL),
    (" all ( ) ", MATCH_ALL),
    ("!all()", Not(MATCH_ALL)),
    # equality, both quoting styles, whitespace variants
    ("app == 'web'", eq("app", "web")),
    ('app == "web"', eq("app", "web")),
    ("app=='web'", eq("app", "web")),
    ("  app\t==\n'web'  ", eq("app", "web")),
    ("app == ''", eq("app", "")),
    ("app == 'a b  c'", eq("app", "a b  c")),
    ("app == 'say \"hi\"'", eq("app", 'say "hi"')),
    ('app == "it\'s"', eq("app", "it's")),
    ("app == '&& || ! ( ) { } , =='", eq("app", "&& || ! ( ) { } , ==")),
    ("app == 'back\\slash'", eq("app", "back\\slash")),
    ("app != 'web'", ne("app", "web")),
    ('app!="web"', ne("app", "web")),
    # label keys: prefixes, dots, dashes, underscores, keywords as keys
    ("projectcalico.org/name == 'default'", eq("projectcalico.org/name", "default")),
    ("kubernetes.io/metadata.name == 'x'", eq("kubernetes.io/metadata.name", "x")),
    ("k8s-app == 'dns'", eq("k8s-app", "dns")),
    ("My_Label.v2 == 'x'", eq("My_Label.v2", "x")),
    ("9 == 'x'", eq("9", "x")),
    ("has == 'x'", eq("has", "x")),
    ("all == 'x'", eq("all", "x")),
    ("global == 'x'", eq("global", "x")),
    ("in in {'x'}", within("in", "x")),
    ("not not in {'x'}", not_within("not", "x")),
    ("contains contains 'x'", contains("contains", "x")),
    ("starts starts with 'x'", starts("starts", "x")),
    ("with ends with 'x'", ends("with", "x")),
    # sets
    ("app in {'a', \"b\"}", within("app", "a", "b")),
    ("app in {'a','b','a'}", within("app", "a", "b")),
    ("app in{'a'}", within("app", "a")),
    ("app in { 'a' , 'b' }", within("app", "a", "b")),
    ("app in {'a',}", within("app", "a")),
    ("app in {}", LabelIn("app", frozenset())),
    ("app in { }", LabelIn("app", frozenset())),
    ("app in {''}", within("app", "")),
    ("app in {'a, b', '}'}", within("app", "a, b", "}")),
    ("app not in {'a', 'b'}", not_within("app", "a", "b")),
    ("app not\tin {}", Not(LabelIn("app", frozenset()))),
    ("app  not   in{'x'}", not_within("app", "x")),
    # has()
    ("has(app)", has("app")),
    ("has( app )", has("app")),
    ("has (app)", has("app")),
    ("has(example.com/role)", has("example.com/role")),
    ("has(has)", has("has")),
    ("!has(app)", Not(has("app"))),
    ("! has(app)", Not(has("app"))),
    # string tests
    ("app starts with 'pay'", starts("app", "pay")),
    ('app starts\t with "pay"', starts("app", "pay")),
    ("app ends with '-v2'", ends("app", "-v2")),
    ("app contains 'ment'", contains("app", "ment")),
    ("app contains''", contains("app", "")),
    ("!app contains 'x'", Not(contains("app", "x"))),
    # && and ||: flattening and precedence
    ("a == '1' && b == '2'", all_of(A, B)),
    ("a == '1'&&b == '2'&&c == '3'", all_of(A, B, C)),
    ("a == '1' || b == '2' || c == '3'", any_of(A, B, C)),
    ("a == '1' || b == '2' && c == '3'", any_of(A, all_of(B, C))),
    ("a == '1' && b == '2' || c == '3'", any_of(all_of(A, B), C)),
    ("a == '1' && b == '2' || c == '3' && d == '4'", any_of(all_of(A, B), all_of(C, D))),
    ("(a == '1' || b == '2') && c == '3'", all_of(any_of(A, B), C)),
    ("a == '1' && (b == '2' || c == '3')", all_of(A, any_of(B, C))),
    ("(a == '1' && b == '2') && c == '3'", all_of(A, B, C)),
    ("a == '1' && (b == '2' && c == '3')", all_of(A, B, C)),
    ("(a == '1' || b == '2') || (c == '3' || d == '4')", any_of(A, B, C, D)),
    ("a == '1' && all()", all_of(A, MATCH_ALL)),
    ("all() || a == '1'", any_of(MATCH_ALL, A)),
    # parentheses
    ("(a == '1')", A),
    ("((((a == '1'))))", A),
    ("( ( a == '1' ) )", A),
    ("((a == '1' || (b == '2' && (c == '3'))))", any_of(A, all_of(B, C))),
    # negation binds tighter than && and ||
    ("!a == '1'", Not(A)),
    ("!a == '1' && b == '2'", all_of(Not(A), B)),
    ("!a == '1' || b == '2'", any_of(Not(A), B)),
    ("!(a == '1' && b == '2')", Not(all_of(A, B))),
    ("!(a == '1' || b == '2') && c == '3'", all_of(Not(any_of(A, B)), C)),
    ("!!a == '1'", Not(Not(A))),
    ("! ! !has(x)", Not(Not(Not(has("x"))))),
    ("!(!(a == '1'))", Not(Not(A))),
    (
        "a != '1' && !has(b) || c not in {'3'}",
        any_of(all_of(ne("a", "1"), Not(has("b"))), not_within("c", "3")),
    ),
    # the documentation's own examples
    ("egress-code == 'blue'", eq("egress-code", "blue")),
    ("projectcalico.org/name == 'egress'", eq("projectcalico.org/name", "egress")),
    ("kubernetes.io/hostname == 'gw-2'", eq("kubernetes.io/hostname", "gw-2")),
]


@pytest.mark.parametrize(("text", "expected"), VALID, ids=[text for text, _ in VALID])
def test_valid_expression_parses_to_tree(text: str, expected: Selector) -> None:
    assert parse_calico_selector(text) == expected


@pytest.mark.parametrize(("text", "expected"), VALID, ids=[text for text, _ in VALID])
def test_rendering_of_parsed_tree_parses_back_to_it(text: str, expected: Selector) -> None:
    assert parse_calico_selector(str(expected)) == expected


def test_label_key_length_limits() -> None:
    prefix = ".".join(["a" * 63] * 4)[:253]
    name = "n" * 63
    assert parse_calico_selector(f"has({prefix}/{name})") == has(f"{prefix}/{name}")
    with pytest.raises(SelectorSyntaxError, match=r"prefix of label key .* has 254 characters"):
        parse_calico_selector(f"has(x{prefix}/{name})")
    with pytest.raises(SelectorSyntaxError, match="has 64 characters: expected at most 63"):
        parse_calico_selector(f"{name}x == 'v'")


def test_nesting_limit() -> None:
    deepest = "(" * MAX_NESTING + "has(a)" + ")" * MAX_NESTING
    assert parse_calico_selector(deepest) == has("a")
    assert parse_calico_selector("!" * MAX_NESTING + "has(a)") is not None
    with pytest.raises(SelectorSyntaxError, match="nested too deeply") as info:
        parse_calico_selector("(" * (MAX_NESTING + 1) + "has(a)" + ")" * (MAX_NESTING + 1))
    assert info.value.position == MAX_NESTING
    with pytest.raises(SelectorSyntaxError, match="nested too deeply"):
        parse_calico_selector("!(" * MAX_NESTING + "has(a)" + ")" * MAX_NESTING)
    with pytest.raises(SelectorSyntaxError, match="nested too deeply"):
        parse_calico_selector("(" * 100_000)


# -- invalid text -------------------------------------------------------------------------

OPERATORS = "expected '==', '!=', 'in', 'not in', 'starts with', 'ends with' or 'contains' after label"
TERM = "expected a label, 'has(', 'all()', '!' or '('"

INVALID: list[tuple[str, int, str]] = [
    # comparisons
    ("app == ", 7, "expected a quoted string after '=='"),
    ("app == web", 7, "expected a quoted string after '==', got 'web'"),
    ("app != ", 7, "expected a quoted string after '!='"),
    ("app != {'x'}", 7, "expected a quoted string after '!=', got '{'"),
    ("app", 3, f"{OPERATORS} 'app'"),
    ("app = 'x'", 4, f"{OPERATORS} 'app', got '=' (write '==')"),
    ("app === 'x'", 6, "expected a quoted string after '==', got '=' (write '==')"),
    ("app 'x'", 4, f"{OPERATORS} 'app', got the string \"x\""),
    ("app notin {'x'}", 4, f"{OPERATORS} 'app', got 'notin'"),
    ("app startswith 'x'", 4, f"{OPERATORS} 'app', got 'startswith'"),
    ("app is 'x'", 4, f"{OPERATORS} 'app', got 'is'"),
    ("app ~ 'x'", 4, f"{OPERATORS} 'app', got '~'"),
    ("app(x)", 3, f"{OPERATORS} 'app', got '('"),
    ("app not 'x'", 8, "expected 'in' after 'not', got the string \"x\""),
    ("app not", 7, "expected 'in' after 'not'"),
    ("app starts 'x'", 11, "expected 'with' after 'starts'"),
    ("app ends  by 'x'", 10, "expected 'with' after 'ends', got 'by'"),
    ("app starts with", 15, "expected a quoted string after 'starts with'"),
    ("app ends with x", 14, "expected a quoted string after 'ends with', got 'x'"),
    ("app contains", 12, "expected a quoted string after 'contains'"),
    # sets
    ("app in 'x'", 7, "expected '{' to open a set of quoted strings after 'in', got the string \"x\""),
    ("app in ('x')", 7, "expected '{' to open a set of quoted strings after 'in', got '('"),
    ("app not in", 10, "expected '{' to open a set of quoted strings after 'not in'"),
    ("app in {'a' 'b'}", 12, "expected ',' or '}' in a set, got the string \"b\""),
    ("app in {'a'", 11, "expected ',' or '}' in a set"),
    ("app in {'a';'b'}", 11, "expected ',' or '}' in a set, got ';'"),
    ("app in {,}", 8, "expected a quoted string or '}' in a set, got ','"),
    ("app in {'a',,}", 12, "expected a quoted string or '}' in a set, got ','"),
    ("app in {a}", 8, "expected a quoted string or '}' in a set, got 'a'"),
    ("app in {'a',", 12, "expected a quoted string or '}' in a set"),
    # strings
    ("app == 'web", 7, "unterminated string: expected a closing quote (')"),
    ('app == "web', 7, 'unterminated string: expected a closing quote (")'),
    ("app == \"web'", 7, 'unterminated string: expected a closing quote (")'),
    ("app in {'a', 'b}", 13, "unterminated string"),
    ("a == 'x' && b == 'y", 17, "unterminated string"),
    # has(), all(), global()
    ("has()", 4, "expected a label name after 'has(', got ')'"),
    ("has('app')", 4, "expected a label name after 'has(', got the string \"app\""),
    ("has(app", 7, "expected ')' after 'has(app'"),
    ("has(app, tier)", 7, "expected ')' after 'has(app', got ','"),
    ("has(", 4, "expected a label name after 'has('"),
    ("all(x)", 4, "expected ')' after 'all(': all() takes no argument, got 'x'"),
    ("all(", 4, "expected ')' after 'all('"),
    ("global()", 0, "global() is not supported for pod, namespace or node selectors"),
    ("has(a) && global()", 10, "global() is not supported"),
    ("!global()", 1, "global() is not supported"),
    # operators and terms
    ("&& a == 'x'", 0, f"{TERM} at the start of the selector, got '&&'"),
    ("a == 'x' &&", 11, f"{TERM} after '&&'"),
    ("a == 'x' || ", 12, f"{TERM} after '||'"),
    ("a == 'x' && || b == 'y'", 12, f"{TERM} after '&&', got '||'"),
    (
        "a == 'x' & b == 'y'",
        9,
        "unexpected text after the end of the selector: expected '&&', '||' or the end",
    ),
    ("a == 'x' & b == 'y'", 9, "got '&' (write '&&')"),
    ("a == 'x' | b == 'y'", 9, "got '|' (write '||')"),
    ("a == 'x' b == 'y'", 9, "unexpected text after the end of the selector"),
    ("a == 'x' 'y'", 9, "unexpected text after the end of the selector: expected '&&', '||' or the end, got"),
    ("has(a) has(b)", 7, "unexpected text after the end of the selector"),
    ("!", 1, f"{TERM} after '!'"),
    ("!!", 2, f"{TERM} after '!'"),
    ("!= 'x'", 0, f"{TERM} at the start of the selector, got '!='"),
    ("'x' == app", 0, f'{TERM} at the start of the selector, got the string "x"'),
    ("== 'x'", 0, f"{TERM} at the start of the selector, got '=='"),
    ("#", 0, f"{TERM} at the start of the selector, got '#'"),
    ("app == 'x' # comment", 11, "unexpected text after the end of the selector"),
    ("\u00e9 == 'x'", 0, f"{TERM} at the start of the selector, got '\u00e9'"),
    ("\x0b", 0, f"{TERM} at the start of the selector"),
    # parentheses
    ("(a == 'x'", 0, "unbalanced '(': expected a ')' to close it"),
    ("((a == 'x')", 0, "unbalanced '('"),
    ("(a == 'x') && (b == 'y'", 14, "unbalanced '('"),
    ("a == 'x')", 8, "unbalanced ')'"),
    ("(a == 'x'))", 10, "unbalanced ')'"),
    (")", 0, f"{TERM} at the start of the selector, got ')'"),
    ("()", 1, f"{TERM} after '(', got ')'"),
    ("(a == 'x' b == 'y')", 10, "expected '&&', '||' or ')', got 'b'"),
    # label keys
    ("-app == 'x'", 0, "the name '-app' of label key '-app' is not valid"),
    ("app- == 'x'", 0, "beginning and ending with a letter or digit"),
    ("_app == 'x'", 0, "is not valid"),
    ("a == 'x' && .b == 'y'", 12, "the name '.b' of label key '.b' is not valid"),
    ("a/b/c == 'x'", 0, "label key 'a/b/c' has more than one '/'"),
    ("/app == 'x'", 0, "label key '/app' has an empty prefix"),
    ("example.com/ == 'x'", 0, "label key 'example.com/' has no name after '/'"),
    (
        "Example.com/app == 'x'",
        0,
        "the prefix 'Example.com' of label key 'Example.com/app' is not a DNS subdomain",
    ),
    ("a_b/app == 'x'", 0, "is not a DNS subdomain"),
    ("a..b/app == 'x'", 0, "is not a DNS subdomain"),
    ("-a.b/app == 'x'", 0, "is not a DNS subdomain"),
    ("has(-x)", 4, "the name '-x' of label key '-x' is not valid"),
    ("has(a/b/c)", 4, "has more than one '/'"),
    ("(x/ in {'a'", 1, "has no name after '/'"),
    ("-a == 'x", 0, "is not valid"),
]


@pytest.mark.parametrize(("text", "position", "fragment"), INVALID, ids=[text for text, _, _ in INVALID])
def test_invalid_expression_reports_position_and_expectation(text: str, position: int, fragment: str) -> None:
    with pytest.raises(SelectorSyntaxError) as info:
        parse_calico_selector(text)
    error = info.value
    assert error.position == position, str(error)
    assert fragment in error.reason, str(error)
    assert error.expression == text
    assert f"at position {position} in " in str(error)


def test_error_message_format() -> None:
    with pytest.raises(SelectorSyntaxError) as info:
        parse_calico_selector("app == ")
    assert str(info.value) == "expected a quoted string after '==' at position 7 in \"app == \""
    assert info.value.reason == "expected a quoted string after '=='"


def test_error_is_a_value_error_of_the_library_and_pickles() -> None:
    with pytest.raises(SelectorSyntaxError) as info:
        parse_calico_selector('a == "x')
    error = info.value
    assert isinstance(error, ValueError)
    assert isinstance(error, EgressCoreError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.expression, copy.position, copy.reason, str(copy)) == (
        error.expression,
        error.position,
        error.reason,
        str(error),
    )


# -- rendering round trips ----------------------------------------------------------------


@pytest.mark.parametrize(
    "tree",
    [
        Not(Not(A)),
        Not(Not(all_of(A, B))),
        Not(contains("a", "x")),
        Not(MATCH_ALL),
        Or(()),
        all_of(any_of(A, B), any_of(C, D)),
        any_of(all_of(A, B), Not(any_of(C, D))),
        LabelIn("k", frozenset()),
        Not(LabelIn("k", frozenset())),
        within("k", 'with "double"', "with 'single'", ""),
    ],
    ids=str,
)
def test_rendering_parses_back_to_an_equivalent_tree(tree: Selector) -> None:
    parsed = parse_calico_selector(str(tree))
    for labels in ({}, {"a": "1"}, {"a": "1", "b": "2"}, {"c": "3", "k": ""}, {"k": "with 'single'"}):
        assert evaluate(parsed, labels) == evaluate(tree, labels), labels
    assert parse_calico_selector(str(parsed)) == parsed


# -- Hypothesis ---------------------------------------------------------------------------


def evaluate(selector: Selector, labels: Mapping[str, str]) -> bool:
    """A literal reading of the semantics in ``egresscore.policy.selector``'s docstring."""
    if isinstance(selector, LabelIn):
        return selector.key in labels and labels[selector.key] in selector.values
    if isinstance(selector, HasLabel):
        return selector.key in labels
    if isinstance(selector, LabelMatch):
        if selector.key not in labels:
            return False
        value = labels[selector.key]
        if selector.op is MatchOp.STARTS_WITH:
            return value.startswith(selector.operand)
        if selector.op is MatchOp.ENDS_WITH:
            return value.endswith(selector.operand)
        return selector.operand in value
    if isinstance(selector, Not):
        return not evaluate(selector.operand, labels)
    if isinstance(selector, And):
        return all(evaluate(operand, labels) for operand in selector.operands)
    return any(evaluate(operand, labels) for operand in selector.operands)


KEYS = st.sampled_from(["app", "tier", "example.com/role", "k8s-app", "a.b_c", "has", "in"])
# A Calico string has no escapes, so one value holds at most one kind of quote.
VALUES = st.text(alphabet="ab '{},&|!()", max_size=4) | st.text(alphabet='ab "', max_size=4)
LABEL_VALUES = st.text(alphabet="ab '\"", max_size=3)
LABELS = st.dictionaries(KEYS, LABEL_VALUES, max_size=4)

LEAVES = st.one_of(
    st.builds(LabelIn, KEYS, st.frozensets(VALUES, max_size=3)),
    st.builds(HasLabel, KEYS),
    st.builds(LabelMatch, KEYS, st.sampled_from(MatchOp), VALUES),
    st.just(MATCH_ALL),
)


def _compound(children: st.SearchStrategy[Selector]) -> st.SearchStrategy[Selector]:
    return st.one_of(
        st.builds(Not, children),
        st.builds(And, st.lists(children, max_size=3).map(tuple)),
        st.builds(Or, st.lists(children, max_size=3).map(tuple)),
    )


TREES: st.SearchStrategy[Selector] = st.recursive(LEAVES, _compound, max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(TREES, st.lists(LABELS, min_size=1, max_size=6))
def test_rendering_round_trip_keeps_meaning(tree: Selector, label_sets: list[dict[str, str]]) -> None:
    parsed = parse_calico_selector(str(tree))
    for labels in label_sets:
        assert evaluate(parsed, labels) == evaluate(tree, labels), (str(tree), labels)
    assert parse_calico_selector(str(parsed)) == parsed


FRAGMENTS = st.sampled_from(
    [
        "a",
        "b/c",
        "==",
        "!=",
        "=",
        "'x'",
        '"y"',
        "'",
        '"',
        "(",
        ")",
        "{",
        "}",
        ",",
        "!",
        "&&",
        "||",
        "&",
        "in",
        "not",
        "starts",
        "ends",
        "with",
        "contains",
        "has",
        "all",
        "global",
        " ",
        "-",
        "\t",
    ]
)
SOUP = st.lists(FRAGMENTS, max_size=14).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | SOUP)
def test_any_text_parses_or_raises_selector_syntax_error(text: str) -> None:
    try:
        tree = parse_calico_selector(text)
    except SelectorSyntaxError as error:
        assert 0 <= error.position <= len(text)
        assert error.expression == text
        openings = ("expected", "unexpected", "unbalanced", "unterminated", "global()", "selector nested")
        assert error.reason.startswith(openings) or "label key" in error.reason, error.reason
    else:
        assert parse_calico_selector(str(tree)) == tree
