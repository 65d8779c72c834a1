"""Calico selector expressions, read into the selector AST of :mod:`egresscore.policy.selector`.

A hand-written tokenizer feeds a recursive-descent parser, one function per rule of
the grammar below. Tokens are scanned one at a time as the parser asks for them, so
the first fault in reading order is the one reported, with its character offset.

Grammar (EBNF; whitespace -- space, tab, CR, LF -- is free between tokens)::

    selector   = [ or_expr ] ;                       (* empty text: all() *)
    or_expr    = and_expr { "||" and_expr } ;
    and_expr   = unary { "&&" unary } ;
    unary      = { "!" } primary ;
    primary    = "(" or_expr ")"
               | "all" "(" ")"
               | "global" "(" ")"                    (* rejected: see below *)
               | "has" "(" key ")"
               | key comparison ;
    comparison = "==" string
               | "!=" string
               | "in" set
               | "not" "in" set
               | "starts" "with" string
               | "ends" "with" string
               | "contains" string ;
    set        = "{" [ string { "," string } [ "," ] ] "}" ;
    string     = "'" { any character but "'" } "'"
               | '"' { any character but '"' } '"' ;  (* no escape sequences *)
    key        = key_char { key_char } ;
    key_char   = "A".."Z" | "a".."z" | "0".."9" | "_" | "." | "/" | "-" ;

Keywords are words (runs of ``key_char``) recognised by their place: ``has``, ``all``
and ``global`` only when a ``(`` follows, the operator words only after a key. So
``has == 'x'`` tests a label named ``has``. Two-word operators (``not in``,
``starts with``, ``ends with``) need whitespace between the words, since ``notin`` is
one word. A key must also be a valid Kubernetes label key: an optional DNS-subdomain
prefix of at most 253 characters and a ``/``, then a name of at most 63 characters of
``[A-Za-z0-9._-]`` that begins and ends with a letter or digit.

Mapping to the AST: ``k == 'v'`` is ``LabelIn(k, {v})`` and ``k in {..}`` is
``LabelIn(k, {..})``; ``!=`` and ``not in`` are ``Not`` of those, so they match an
object without the label, as in Calico. ``has(k)`` is ``HasLabel``; the string tests
are ``LabelMatch``; ``all()`` and the empty selector are ``MATCH_ALL``. ``&&`` and
``||`` chains become one flat ``And``/``Or`` (also across parentheses, which is why
``parse(str(node))`` is a fixed point); a chain of one is its operand alone.

``global()`` selects non-namespaced resources in Calico. Pods, namespaces and nodes
are never what it selects here, so it is rejected rather than read as "nothing".
"""

from __future__ import annotations

import enum
import json
import re
import string
from dataclasses import dataclass
from typing import NoReturn

from egresscore.errors import EgressCoreError
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

__all__ = ["MAX_NESTING", "SelectorSyntaxError", "parse_calico_selector"]

#: Most ``(`` and ``!`` that may enclose a term. Deeper input is refused so that neither
#: this parser nor the code walking the tree hits Python's recursion limit.
MAX_NESTING = 100


class SelectorSyntaxError(EgressCoreError, ValueError):
    """A Calico selector expression could not be read.

    ``expression`` is the text, ``position`` the 0-based character offset of the fault
    (the opening quote or ``(`` that is never closed; ``len(expression)`` when the text
    ends too early) and ``reason`` what was wrong and what was expected. ``str(error)``
    puts the three together.
    """

    def __init__(self, expression: str, position: int, reason: str) -> None:
        self.expression = expression
        self.position = position
        self.reason = reason
        super().__init__(f"{reason} at position {position} in {json.dumps(expression, ensure_ascii=False)}")

    def __reduce__(self) -> tuple[type[SelectorSyntaxError], tuple[str, int, str]]:
        # The default would call the class with the formatted message only.
        return (type(self), (self.expression, self.position, self.reason))


def parse_calico_selector(text: str) -> Selector:
    """The selector AST for the Calico selector expression ``text``.

    Empty or all-whitespace text is ``MATCH_ALL``, as in Calico. Raises
    :class:`SelectorSyntaxError` for anything outside the grammar of this module's
    docstring, for a label key Kubernetes would refuse, and for ``global()``.
    """
    return _Parser(text).parse_selector()


# -- tokenizer ------------------------------------------------------------------------


class _Kind(enum.Enum):
    WORD = "word"  # a key, or a keyword where the grammar allows one
    STRING = "string"
    LPAREN = "'('"
    RPAREN = "')'"
    LBRACE = "'{'"
    RBRACE = "'}'"
    COMMA = "','"
    EQ = "'=='"
    NE = "'!='"
    NOT = "'!'"
    AND = "'&&'"
    OR = "'||'"
    INVALID = "invalid"  # a character no token starts with; the parser says what it expected instead
    END = "end"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _Kind
    text: str  # the word, the string's contents, or the characters read
    position: int
    end: int

    def describe(self) -> str:
        if self.kind is _Kind.WORD:
            return f"'{self.text}'"
        if self.kind is _Kind.STRING:
            return f"the string {json.dumps(self.text, ensure_ascii=False)}"
        if self.kind is _Kind.END:
            return "the end of the selector"
        if self.kind is _Kind.INVALID:
            hint = _SINGLE_CHARACTER_HINTS.get(self.text, "")
            return f"{self.text!r}{hint}"
        return str(self.kind.value)


_WHITESPACE = frozenset(" \t\r\n")
_KEY_CHARACTERS = frozenset(string.ascii_letters + string.digits + "_./-")
_PAIRS = {"==": _Kind.EQ, "!=": _Kind.NE, "&&": _Kind.AND, "||": _Kind.OR}
_SINGLES = {
    "(": _Kind.LPAREN,
    ")": _Kind.RPAREN,
    "{": _Kind.LBRACE,
    "}": _Kind.RBRACE,
    ",": _Kind.COMMA,
    "!": _Kind.NOT,
}
_SINGLE_CHARACTER_HINTS = {"=": " (write '==')", "&": " (write '&&')", "|": " (write '||')"}


def _scan(text: str, start: int) -> _Token:
    """The token at or after offset ``start`` of ``text`` (skipping whitespace)."""
    position = start
    length = len(text)
    while position < length and text[position] in _WHITESPACE:
        position += 1
    if position == length:
        return _Token(_Kind.END, "", position, position)
    char = text[position]
    pair = text[position : position + 2]
    # Pairs first: "!=" is one token, not "!" then "=".
    if pair in _PAIRS:
        return _Token(_PAIRS[pair], pair, position, position + 2)
    if char in _SINGLES:
        return _Token(_SINGLES[char], char, position, position + 1)
    if char in "'\"":
        close = text.find(char, position + 1)
        if close < 0:
            raise SelectorSyntaxError(
                text, position, f"unterminated string: expected a closing quote ({char}) to match this one"
            )
        return _Token(_Kind.STRING, text[position + 1 : close], position, close + 1)
    if char in _KEY_CHARACTERS:
        end = position + 1
        while end < length and text[end] in _KEY_CHARACTERS:
            end += 1
        return _Token(_Kind.WORD, text[position:end], position, end)
    return _Token(_Kind.INVALID, char, position, position + 1)


# -- label keys -------------------------------------------------------------------------

# Kubernetes IsQualifiedName: the prefix is a lowercase RFC 1123 subdomain, the name
# may mix case and use '_' and '.'.
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_MAX_PREFIX = 253
_MAX_NAME = 63


def _label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a Kubernetes label key, or None when it is one."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if "/" in prefix:
            return f"label key '{key}' has more than one '/': expected an optional prefix, '/' and a name"
        if not prefix:
            return f"label key '{key}' has an empty prefix: expected a DNS subdomain before '/'"
        if len(prefix) > _MAX_PREFIX:
            return (
                f"the prefix of label key '{key}' has {len(prefix)} characters: "
                f"expected at most {_MAX_PREFIX}"
            )
        if not _DNS_SUBDOMAIN.fullmatch(prefix):
            return (
                f"the prefix '{prefix}' of label key '{key}' is not a DNS subdomain: expected lowercase "
                "letters, digits, '-' and '.', each part between dots beginning and ending with a "
                "letter or digit"
            )
    if not name:
        return f"label key '{key}' has no name after '/': expected a name of 1 to {_MAX_NAME} characters"
    if len(name) > _MAX_NAME:
        return f"the name of label key '{key}' has {len(name)} characters: expected at most {_MAX_NAME}"
    if not _LABEL_NAME.fullmatch(name):
        return (
            f"the name '{name}' of label key '{key}' is not valid: expected letters, digits, '-', '_' "
            "and '.', beginning and ending with a letter or digit"
        )
    return None


# -- parser -------------------------------------------------------------------------------

_OPERATORS = "'==', '!=', 'in', 'not in', 'starts with', 'ends with' or 'contains'"
_TERM = "a label, 'has(', 'all()', '!' or '('"
_MATCH_OPS = {"starts": MatchOp.STARTS_WITH, "ends": MatchOp.ENDS_WITH}


class _Parser:
    """One parse of one expression; each ``parse_*`` method reads one grammar rule."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.previous: _Token | None = None
        self.token = _scan(text, 0)
        self.nesting = 0

    # -- helpers --

    def advance(self) -> _Token:
        """Consume the current token and scan the next one."""
        token = self.token
        self.previous = token
        self.token = _scan(self.text, token.end)
        return token

    def at(self, kind: _Kind) -> bool:
        # A method rather than inline tests, because type checkers would otherwise
        # narrow self.token.kind across advance() calls.
        return self.token.kind is kind

    def at_word(self, word: str) -> bool:
        return self.at(_Kind.WORD) and self.token.text == word

    def fail(self, reason: str, position: int) -> NoReturn:
        raise SelectorSyntaxError(self.text, position, reason)

    def expected(self, what: str) -> NoReturn:
        """Fail at the current token, which is not ``what`` the grammar needs here."""
        found = "" if self.at(_Kind.END) else f", got {self.token.describe()}"
        self.fail(f"expected {what}{found}", self.token.position)

    def enter(self, token: _Token) -> None:
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            self.fail(
                f"selector nested too deeply: expected at most {MAX_NESTING} levels of '(' and '!'",
                token.position,
            )

    # -- rules --

    def parse_selector(self) -> Selector:
        if self.at(_Kind.END):
            return MATCH_ALL
        selector = self.parse_or()
        if self.at(_Kind.RPAREN):
            self.fail(
                "unbalanced ')': no '(' is open for it to close; expected '&&', '||' or the end",
                self.token.position,
            )
        if not self.at(_Kind.END):
            self.fail(
                "unexpected text after the end of the selector: expected '&&', '||' or the end, "
                f"got {self.token.describe()}",
                self.token.position,
            )
        return selector

    def parse_or(self) -> Selector:
        operands = [self.parse_and()]
        while self.at(_Kind.OR):
            self.advance()
            operands.append(self.parse_and())
        return _flatten(Or, operands)

    def parse_and(self) -> Selector:
        operands = [self.parse_unary()]
        while self.at(_Kind.AND):
            self.advance()
            operands.append(self.parse_unary())
        return _flatten(And, operands)

    def parse_unary(self) -> Selector:
        # A loop, not recursion, so that "!!!!..." costs no stack.
        negations = 0
        while self.at(_Kind.NOT):
            self.enter(self.advance())
            negations += 1
        selector = self.parse_primary()
        for _ in range(negations):
            selector = Not(selector)
        self.nesting -= negations
        return selector

    def parse_primary(self) -> Selector:
        token = self.token
        if token.kind is _Kind.LPAREN:
            self.enter(self.advance())
            selector = self.parse_or()
            if self.at(_Kind.END):
                # The open '(' is the fault to point at, as the opening quote is for a string.
                self.fail("unbalanced '(': expected a ')' to close it before the end", token.position)
            if not self.at(_Kind.RPAREN):
                self.expected("'&&', '||' or ')'")
            self.advance()
            self.nesting -= 1
            return selector
        if token.kind is not _Kind.WORD:
            where = (
                "at the start of the selector"
                if self.previous is None
                else f"after {self.previous.describe()}"
            )
            self.expected(f"{_TERM} {where}")
        # Checked before scanning on, so a bad key is reported before any later fault.
        # ("has", "all" and "global" are valid keys: the next token tells which they are.)
        problem = _label_key_problem(token.text)
        if problem is not None:
            self.fail(problem, token.position)
        self.advance()
        if self.at(_Kind.LPAREN) and token.text in ("has", "all", "global"):
            return self.parse_call(token)
        return self.parse_comparison(token.text)

    def parse_call(self, name: _Token) -> Selector:
        if name.text == "global":
            self.fail(
                "global() is not supported for pod, namespace or node selectors: it selects only "
                "non-namespaced resources; expected a label test or all()",
                name.position,
            )
        self.advance()  # "("
        if name.text == "all":
            if not self.at(_Kind.RPAREN):
                self.expected("')' after 'all(': all() takes no argument")
            self.advance()
            return MATCH_ALL
        key = self.token
        if key.kind is not _Kind.WORD:
            self.expected("a label name after 'has('")
        problem = _label_key_problem(key.text)
        if problem is not None:
            self.fail(problem, key.position)
        self.advance()
        if not self.at(_Kind.RPAREN):
            self.expected(f"')' after 'has({key.text}'")
        self.advance()
        return HasLabel(key.text)

    def parse_comparison(self, key: str) -> Selector:
        operator = self.token
        if operator.kind is _Kind.EQ:
            self.advance()
            return LabelIn(key, frozenset({self.parse_string("'=='")}))
        if operator.kind is _Kind.NE:
            self.advance()
            return Not(LabelIn(key, frozenset({self.parse_string("'!='")})))
        if operator.kind is _Kind.WORD:
            word = operator.text
            if word == "in":
                self.advance()
                return LabelIn(key, self.parse_set("'in'"))
            if word == "not":
                self.advance()
                if not self.at_word("in"):
                    self.expected("'in' after 'not'")
                self.advance()
                return Not(LabelIn(key, self.parse_set("'not in'")))
            if word in _MATCH_OPS:
                self.advance()
                if not self.at_word("with"):
                    self.expected(f"'with' after '{word}'")
                self.advance()
                return LabelMatch(key, _MATCH_OPS[word], self.parse_string(f"'{word} with'"))
            if word == "contains":
                self.advance()
                return LabelMatch(key, MatchOp.CONTAINS, self.parse_string("'contains'"))
        self.expected(f"{_OPERATORS} after label '{key}'")

    def parse_string(self, after: str) -> str:
        if not self.at(_Kind.STRING):
            self.expected(f"a quoted string after {after}")
        return self.advance().text

    def parse_set(self, after: str) -> frozenset[str]:
        if not self.at(_Kind.LBRACE):
            self.expected(f"'{{' to open a set of quoted strings after {after}")
        self.advance()
        values: set[str] = set()
        # Calico accepts a trailing comma ({'a',}) but not a lone one ({,}).
        while not self.at(_Kind.RBRACE):
            if not self.at(_Kind.STRING):
                self.expected("a quoted string or '}' in a set")
            values.add(self.advance().text)
            if self.at(_Kind.COMMA):
                self.advance()
            elif not self.at(_Kind.RBRACE):
                self.expected("',' or '}' in a set")
        self.advance()
        return frozenset(values)


def _flatten(kind: type[And] | type[Or], operands: list[Selector]) -> Selector:
    """One ``kind`` node of ``operands``, splicing in operands that are ``kind`` nodes themselves.

    Parenthesised chains are spliced so that ``(a && b) && c`` reads the same as its
    rendering ``a && b && c``. An empty ``And`` (``all()``) is kept as written.
    """
    if len(operands) == 1:
        return operands[0]
    flat: list[Selector] = []
    for operand in operands:
        if isinstance(operand, kind) and operand.operands:
            flat.extend(operand.operands)
        else:
            flat.append(operand)
    return kind(tuple(flat))
