"""A small, safe expression language over table columns, for target files.

Target files come from users, so expressions are never handed to ``eval``/``exec``. They
are parsed with :mod:`ast` and evaluated by walking the tree with a whitelist of node
types; anything else (attribute access, subscripts, lambdas, comprehensions, calls outside
the list below, names starting with ``__``) is refused with a :class:`TargetError`.

The language
------------
- column names: ``age``; a name that is not a Python identifier goes in backticks:
  ``` `sch.wide` ```
- literals: numbers, strings in single or double quotes, ``True``, ``False``
- arithmetic: ``+ - * / // % **`` and unary ``-``/``+``; booleans count as 0/1
- comparisons, chained too: ``== != < <= > >=``, e.g. ``18 <= age < 65``
- ``in`` / ``not in`` with a list literal: ``state in ["CA", "NY"]``
- logic, element-wise: ``and or not``
- functions: ``abs(x)``, ``where(cond, a, b)``, ``clip(x, lo, hi)``, ``isnull(x)``

Missing values (NaN, None) are tracked through every operation. ``isnull(x)`` turns them
into a boolean; an expression whose result still depends on a missing value is an error
that names the columns and counts the rows, so nothing is silently dropped.
"""

from __future__ import annotations

import ast
import difflib
import functools
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from l0calib.exceptions import TargetError

__all__ = ["ColumnSource", "Expression", "ExpressionError", "parse_expression"]

MAX_LENGTH = 10_000
MAX_DEPTH = 64
MAX_TERMS = 256  # terms of one chain of binary operators (a + b + ...)
MEMO_SIZE = 64  # sub-expression results kept per table
_MEMO_NODES = (ast.Compare, ast.BoolOp)  # boolean results: 1 byte per row
FUNCTIONS = {"abs": 1, "where": 3, "clip": 3, "isnull": 1}
_BACKTICK_PREFIX = "_l0calib_quoted_"


class ExpressionError(TargetError):
    """An expression cannot be parsed or evaluated. ``column`` is set for unknown names."""

    def __init__(self, message: str, *, column: str | None = None) -> None:
        super().__init__(message)
        self.column = column


# ---------------------------------------------------------------------------- values
@dataclass(frozen=True)
class Value:
    """An evaluated sub-expression: a column-length array (or a scalar) and its kind."""

    data: np.ndarray | float | str | bool
    kind: str  # "num", "bool" or "str"
    missing: np.ndarray | None = None  # rows whose value depends on a missing input
    missing_from: frozenset[str] = field(default_factory=frozenset)

    def as_num(self, what: str) -> np.ndarray | float:
        if self.kind == "str":
            raise ExpressionError(f"{what} needs numbers but got text")
        if self.kind == "bool":
            return (
                np.asarray(self.data, dtype=np.float64)
                if isinstance(self.data, np.ndarray)
                else float(self.data)
            )
        return self.data  # type: ignore[return-value]

    def as_bool(self, what: str) -> np.ndarray | bool:
        if self.kind != "bool":
            noun = "text" if self.kind == "str" else "a number"
            raise ExpressionError(
                f"{what} needs true/false values but got {noun} (use a comparison such as x > 0)"
            )
        return self.data  # type: ignore[return-value]


def _merge_missing(*values: Value) -> tuple[np.ndarray | None, frozenset[str]]:
    masks = [v.missing for v in values if v.missing is not None]
    sources = frozenset().union(*(v.missing_from for v in values))
    if not masks:
        return None, sources
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out, sources


class ColumnSource:
    """Columns of one table, converted to numpy once and shared by many expressions.

    Parameters
    ----------
    frame : pandas.DataFrame
        The entity table (households or persons).
    parent, parent_rows : optional
        For a person table: the households' source and, per person, the row of its
        household. Household columns the persons lack are then readable per person.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        *,
        parent: ColumnSource | None = None,
        parent_rows: np.ndarray | None = None,
    ) -> None:
        self.frame = frame
        self.n_rows = len(frame)
        self.parent = parent
        self.parent_rows = parent_rows
        # Recently evaluated conditions (comparisons, and/or), so targets that
        # share a condition such as state == "CA" compute it once. Bounded: memory stays
        # independent of the number of targets.
        self.memo: OrderedDict[str, Value] = OrderedDict()
        own = [str(c) for c in frame.columns]
        inherited = [c for c in parent.columns if c not in set(own)] if parent else []
        self.columns = own + inherited
        self._own = set(own)
        self._cache: dict[str, Value] = {}

    def get(self, name: str) -> Value:
        """The column ``name`` as a :class:`Value` (converted once, then cached)."""
        if name not in self._cache:
            self._cache[name] = self._convert(name) if name in self._own else self._inherit(name)
        return self._cache[name]

    def _inherit(self, name: str) -> Value:
        # A person expression may use a household column: each person takes its household's.
        if self.parent is None or self.parent_rows is None:
            raise KeyError(name)  # unreachable: evaluate() checks names against self.columns
        v = self.parent.get(name)
        rows = self.parent_rows
        missing = v.missing[rows] if v.missing is not None else None
        if missing is not None and not missing.any():
            missing = None
        data = np.asarray(v.data)[rows]
        return Value(data, v.kind, missing, v.missing_from if missing is not None else frozenset())

    def _convert(self, name: str) -> Value:
        col = self.frame[name]
        missing = col.isna().to_numpy()
        has_missing = bool(missing.any())
        mask = missing if has_missing else None
        sources = frozenset([name]) if has_missing else frozenset()
        if pd.api.types.is_bool_dtype(col.dtype):
            data = col.fillna(False).to_numpy(dtype=bool)
            return Value(data, "bool", mask, sources)
        if pd.api.types.is_numeric_dtype(col.dtype):
            data = col.to_numpy(dtype=np.float64, na_value=np.nan)
            return Value(data, "num", mask, sources)
        values = col.to_numpy(dtype=object)
        non_missing = values[~missing]
        if len(non_missing) and all(isinstance(v, (bool, np.bool_)) for v in non_missing):
            data = np.where(missing, False, values).astype(bool)
            return Value(data, "bool", mask, sources)
        data = np.where(missing, "", values.astype(str) if len(values) else values)
        return Value(np.asarray(data, dtype=object), "str", mask, sources)


# ---------------------------------------------------------------------------- parsing
def _replace_backticks(text: str) -> tuple[str, dict[str, str]]:
    """Swap each `quoted name` for a placeholder identifier, outside string literals."""
    out: list[str] = []
    names: dict[str, str] = {}
    i, quote = 0, ""
    while i < len(text):
        ch = text[i]
        if quote:
            out.append(ch)
            if ch == "\\" and i + 1 < len(text):
                out.append(text[i + 1])
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "`":
            end = text.find("`", i + 1)
            if end < 0:
                raise ExpressionError(f"unclosed backtick at position {i + 1} in {_short(text)}")
            name = text[i + 1 : end]
            if not name:
                raise ExpressionError(f"empty backtick name at position {i + 1} in {_short(text)}")
            placeholder = f"{_BACKTICK_PREFIX}{len(names)}"
            names[placeholder] = name
            out.append(f" {placeholder} ")
            i = end
        else:
            out.append(ch)
        i += 1
    return "".join(out), names


_ALLOWED_NODES: tuple[type[ast.AST], ...] = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.Name,
    ast.Constant,
    ast.Call,
    ast.List,
    ast.Tuple,
    ast.Load,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.USub,
    ast.UAdd,
    ast.Not,
    ast.And,
    ast.Or,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.In,
    ast.NotIn,
)

_NODE_NAMES = {
    ast.Attribute: "attribute access (.)",
    ast.Subscript: "indexing ([...])",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.IfExp: "'x if c else y' (use where(c, x, y))",
    ast.Dict: "dictionaries",
    ast.Set: "sets (use a list: [a, b])",
    ast.Starred: "'*'",
    ast.NamedExpr: "':='",
    ast.JoinedStr: "f-strings",
    ast.Await: "await",
}


def _short(text: str, limit: int = 80) -> str:
    """The expression as shown in messages: quoted, cut to ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _describe(node: ast.AST) -> str:
    return _NODE_NAMES.get(type(node), type(node).__name__)


@dataclass(frozen=True)
class Expression:
    """A parsed, validated expression. Build with :func:`parse_expression`."""

    text: str
    tree: ast.Expression
    quoted: Mapping[str, str]

    @property
    def columns(self) -> list[str]:
        """Column names the expression reads, in order of first use."""
        seen: dict[str, None] = {}
        functions = {id(n.func) for n in ast.walk(self.tree) if isinstance(n, ast.Call)}
        names = [n for n in ast.walk(self.tree) if isinstance(n, ast.Name)]
        for node in sorted(names, key=lambda n: (n.lineno, n.col_offset)):
            if id(node) not in functions:
                seen.setdefault(self.quoted.get(node.id, node.id), None)
        return list(seen)

    def evaluate(self, source: ColumnSource) -> Value:
        """Evaluate over ``source``'s columns. Raises :class:`ExpressionError`."""
        missing = [c for c in self.columns if c not in source.columns]
        if missing:
            name = missing[0]
            hint = closest(name, source.columns)
            suggestion = f" (did you mean '{hint}'?)" if hint else ""
            raise ExpressionError(f"column '{name}' is not in the data{suggestion}", column=name)
        with np.errstate(all="ignore"):
            return _Evaluator(self, source).visit(self.tree.body)


@functools.lru_cache(maxsize=4096)
def parse_expression(text: str) -> Expression:
    """Parse and validate an expression without evaluating it.

    Parameters
    ----------
    text : str
        The expression, e.g. ``'state == "CA" and age >= 65'``.

    Returns
    -------
    Expression

    Raises
    ------
    ExpressionError
        On a syntax error (with the position) or a construct outside the language.

    Parsed expressions are cached (they are immutable), so a target file's expressions
    are parsed once although they are validated before they are evaluated.

    Example
    -------
    >>> parse_expression("`sch.wide` == 'Yes' and api99 > 600").columns
    ['sch.wide', 'api99']
    """
    if not isinstance(text, str):
        raise ExpressionError(f"an expression must be text, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression is longer than {MAX_LENGTH} characters")
    source, quoted = _replace_backticks(text)
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        stripped = source.strip()
        at_end = not exc.offset or exc.offset > len(stripped)
        pos = " at the end" if at_end else f" at column {exc.offset}"
        raise ExpressionError(f"syntax error{pos} in {_short(text)}: {exc.msg}") from None
    except (RecursionError, MemoryError):
        raise ExpressionError(f"expression is too deeply nested: {_short(text)}") from None
    except ValueError as exc:  # e.g. an integer literal with thousands of digits
        raise ExpressionError(f"cannot parse {_short(text)}: {exc}") from None
    _validate(tree, text, quoted)
    return Expression(text=text, tree=tree, quoted=quoted)


def _validate(tree: ast.Expression, text: str, quoted: Mapping[str, str]) -> None:
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ExpressionError(f"expression is nested more than {MAX_DEPTH} levels deep")
        if not isinstance(node, _ALLOWED_NODES):
            raise ExpressionError(
                f"{_describe(node)} is not allowed in expressions: {_short(text)}"
            )
        if isinstance(node, ast.Name):
            if node.id.startswith("__"):
                raise ExpressionError(f"names starting with '__' are not allowed: {node.id!r}")
            if node.id in ("None",):
                raise ExpressionError("None is not allowed (use isnull(x))")
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (bool, int, float, str)):
                raise ExpressionError(f"literal {node.value!r} is not allowed in expressions")
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                shown = node.func.id if isinstance(node.func, ast.Name) else _describe(node.func)
                allowed = ", ".join(FUNCTIONS)
                raise ExpressionError(
                    f"function {shown!r} is not allowed (allowed: {allowed}) in {_short(text)}"
                )
            if node.keywords:
                raise ExpressionError(f"{node.func.id}() takes no keyword arguments")
            want = FUNCTIONS[node.func.id]
            if len(node.args) != want:
                raise ExpressionError(
                    f"{node.func.id}() takes {want} argument{'s' * (want > 1)}, "
                    f"got {len(node.args)}"
                )
            stack.extend((a, depth + 1) for a in node.args)
            continue
        elif isinstance(node, ast.Compare):
            if isinstance(node.left, (ast.List, ast.Tuple)):
                raise ExpressionError("a list may only appear after 'in' / 'not in'")
            for op, right in zip(node.ops, node.comparators, strict=True):
                is_list = isinstance(right, (ast.List, ast.Tuple))
                if isinstance(op, (ast.In, ast.NotIn)) != is_list:
                    raise ExpressionError("'in' needs a list literal on its right: x in [1, 2]")
                if is_list:
                    _check_list(right)
            operands = [node.left, *node.comparators]
            stack.extend(
                (c, depth + 1) for c in operands if not isinstance(c, (ast.List, ast.Tuple))
            )
            continue
        elif isinstance(node, (ast.List, ast.Tuple)):
            raise ExpressionError("a list may only appear after 'in' / 'not in'")
        if isinstance(node, ast.BinOp) and isinstance(node.left, ast.BinOp):
            # A flat sum (a + b + c ...) is a chain down the left, not nesting: it counts
            # once, up to MAX_TERMS terms (the evaluator recurses along it).
            terms, left = 2, node.left
            while isinstance(left, ast.BinOp):
                terms, left = terms + 1, left.left
            if terms > MAX_TERMS:
                raise ExpressionError(
                    f"expression chains more than {MAX_TERMS} terms with operators; split it "
                    "into several targets or variables"
                )
            stack.append((node.left, depth))
            stack.append((node.right, depth + 1))
            continue
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _check_list(node: ast.List | ast.Tuple) -> None:
    for elt in node.elts:
        negated = isinstance(elt, ast.UnaryOp) and isinstance(elt.op, ast.USub)
        if negated:
            elt = elt.operand  # type: ignore[attr-defined]
        allowed = (int, float) if negated else (int, float, str)
        if not isinstance(elt, ast.Constant) or not isinstance(elt.value, allowed):
            raise ExpressionError("lists may only hold literals, as in x in [1, 2]")


# ---------------------------------------------------------------------------- evaluation
_ARITH: dict[type[ast.operator], tuple[str, Callable]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
    ast.FloorDiv: ("//", np.floor_divide),
    ast.Mod: ("%", np.mod),
    ast.Pow: ("**", np.power),
}
_CMP: dict[type[ast.cmpop], tuple[str, Callable]] = {
    ast.Eq: ("==", operator.eq),
    ast.NotEq: ("!=", operator.ne),
    ast.Lt: ("<", operator.lt),
    ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt),
    ast.GtE: (">=", operator.ge),
}


class _Evaluator:
    def __init__(self, expr: Expression, source: ColumnSource) -> None:
        self.expr = expr
        self.source = source

    def visit(self, node: ast.AST) -> Value:
        method = getattr(self, f"visit_{type(node).__name__}")
        if not isinstance(node, _MEMO_NODES):
            return method(node)
        memo = self.source.memo
        # Backtick placeholders differ between expressions; key on the real column names.
        key = ast.dump(node) if not self.expr.quoted else f"{self.expr.quoted}{ast.dump(node)}"
        hit = memo.get(key)
        if hit is not None:
            memo.move_to_end(key)
            return hit
        value = method(node)
        memo[key] = value
        if len(memo) > MEMO_SIZE:
            memo.popitem(last=False)
        return value

    def visit_Constant(self, node: ast.Constant) -> Value:
        v = node.value
        if isinstance(v, bool):
            return Value(v, "bool")
        if isinstance(v, str):
            return Value(v, "str")
        # Numbers are floats from the start, so '10 ** 10 ** 10' overflows to inf instead
        # of building a huge Python integer.
        try:
            return Value(float(v), "num")
        except OverflowError:
            raise ExpressionError(f"number {str(v)[:20]}... is too large") from None

    def visit_Name(self, node: ast.Name) -> Value:
        return self.source.get(self.expr.quoted.get(node.id, node.id))

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Value:
        v = self.visit(node.operand)
        if isinstance(node.op, ast.Not):
            return Value(np.logical_not(v.as_bool("'not'")), "bool", v.missing, v.missing_from)
        x = v.as_num(f"unary '{'-' if isinstance(node.op, ast.USub) else '+'}'")
        return Value(-x if isinstance(node.op, ast.USub) else +x, "num", v.missing, v.missing_from)

    def visit_BinOp(self, node: ast.BinOp) -> Value:
        symbol, fn = _ARITH[type(node.op)]
        a, b = self.visit(node.left), self.visit(node.right)
        x, y = a.as_num(f"'{symbol}'"), b.as_num(f"'{symbol}'")
        missing, sources = _merge_missing(a, b)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out = np.asarray(fn(np.float64(x), y), dtype=np.float64)
        # 0/0, inf - inf...: no value, from defined inputs. Tracked as missing, so a filter
        # never turns it into a silent False.
        undefined = (
            np.isnan(out)
            & ~np.isnan(np.asarray(x, dtype=np.float64))
            & ~np.isnan(np.asarray(y, dtype=np.float64))
        )
        if undefined.any():
            base = missing if missing is not None else np.zeros(out.shape, dtype=bool)
            missing = base | undefined
            sources = sources | {f"{_UNDEFINED}{symbol}"}
        return Value(out, "num", missing, sources)

    def visit_BoolOp(self, node: ast.BoolOp) -> Value:
        name = "and" if isinstance(node.op, ast.And) else "or"
        values = [self.visit(v) for v in node.values]
        fn = np.logical_and if name == "and" else np.logical_or
        out = values[0].as_bool(f"'{name}'")
        for v in values[1:]:
            out = fn(out, v.as_bool(f"'{name}'"))
        missing, sources = _merge_missing(*values)
        return Value(out, "bool", missing, sources)

    def visit_Compare(self, node: ast.Compare) -> Value:
        left = self.visit(node.left)
        parts: list[Value] = []
        result: np.ndarray | bool | None = None
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, (ast.In, ast.NotIn)):
                right = None
                cmp = self._membership(left, right_node, negate=isinstance(op, ast.NotIn))
                parts.append(left)
            else:
                right = self.visit(right_node)
                cmp = self._compare(left, right, op)
                parts.extend((left, right))
            result = cmp if result is None else np.logical_and(result, cmp)
            if right is not None:
                left = right
        missing, sources = _merge_missing(*parts)
        return Value(result, "bool", missing, sources)

    def _compare(self, a: Value, b: Value, op: ast.cmpop) -> np.ndarray | bool:
        symbol, fn = _CMP[type(op)]
        if (a.kind == "str") != (b.kind == "str"):
            num = "true/false" if "bool" in (a.kind, b.kind) else "a number"
            raise ExpressionError(
                f"cannot compare text with {num} using '{symbol}' "
                '(quote text values: state == "CA")'
            )
        if a.kind == "str":
            return np.asarray(fn(a.data, b.data), dtype=bool)
        return np.asarray(fn(a.as_num(symbol), b.as_num(symbol)), dtype=bool)

    def _membership(self, a: Value, node: ast.AST, *, negate: bool) -> np.ndarray | bool:
        items = [self._literal(e) for e in node.elts]  # type: ignore[attr-defined]
        word = "not in" if negate else "in"
        if a.kind == "str":
            if any(not isinstance(i, str) for i in items):
                raise ExpressionError(f"'{word}' compares text with a list that holds non-text")
            out = np.isin(np.asarray(a.data, dtype=object), np.asarray(items, dtype=object))
        else:
            if any(isinstance(i, str) for i in items):
                raise ExpressionError(f"'{word}' compares numbers with a list that holds text")
            out = np.isin(np.asarray(a.as_num(word), dtype=np.float64), np.asarray(items, float))
        return np.logical_not(out) if negate else out

    def _literal(self, node: ast.AST) -> float | str:
        if isinstance(node, ast.UnaryOp):
            return -self._literal(node.operand)  # type: ignore[operator]
        value = self.visit_Constant(node).data  # type: ignore[arg-type]
        return value if isinstance(value, str) else float(value)  # type: ignore[arg-type]

    def visit_Call(self, node: ast.Call) -> Value:
        name = node.func.id  # type: ignore[attr-defined]
        args = [self.visit(a) for a in node.args]
        if name == "isnull":
            v = args[0]
            n = self.source.n_rows
            data = v.missing if v.missing is not None else np.zeros(n, dtype=bool)
            return Value(data, "bool")
        if name == "abs":
            v = args[0]
            return Value(np.abs(v.as_num("abs()")), "num", v.missing, v.missing_from)
        if name == "clip":
            x, lo, hi = (a.as_num("clip()") for a in args)
            missing, sources = _merge_missing(*args)
            return Value(np.clip(x, lo, hi), "num", missing, sources)
        cond_v, a, b = args
        cond = cond_v.as_bool("where()'s condition")
        if (a.kind == "str") != (b.kind == "str"):
            raise ExpressionError("where() needs both branches to be text, or neither")
        kind = "str" if a.kind == "str" else ("bool" if a.kind == b.kind == "bool" else "num")
        if kind == "num":
            data = np.where(cond, a.as_num("where()"), b.as_num("where()"))
        else:
            data = np.where(cond, a.data, b.data)
        missing = self._where_missing(cond, cond_v, a, b)
        sources = cond_v.missing_from | a.missing_from | b.missing_from
        return Value(data, kind, missing, sources)

    def _where_missing(
        self, cond: np.ndarray | bool, c: Value, a: Value, b: Value
    ) -> np.ndarray | None:
        # A missing value in the branch not taken does not matter.
        n = self.source.n_rows
        ma = a.missing if a.missing is not None else np.zeros(n, dtype=bool)
        mb = b.missing if b.missing is not None else np.zeros(n, dtype=bool)
        out = np.where(cond, ma, mb)
        if c.missing is not None:
            out = out | c.missing
        return out if np.any(out) else None


_UNDEFINED = "\x00"  # marks an operation, not a column, among a value's missing sources


def missing_message(value: Value) -> str | None:
    """Describe rows whose result depends on a missing input, or ``None`` if there are none."""
    if value.missing is None:
        return None
    count = int(np.count_nonzero(value.missing))
    if count == 0:
        return None
    rows = "row" if count == 1 else "rows"
    ops = sorted(c[len(_UNDEFINED) :] for c in value.missing_from if c.startswith(_UNDEFINED))
    names = sorted(c for c in value.missing_from if not c.startswith(_UNDEFINED))
    if ops and not names:
        shown = ", ".join(f"'{o}'" for o in ops)
        return (
            f"{shown} has no defined result (such as 0/0) in {count:,} {rows} used by this "
            "expression (guard it with where())"
        )
    cols = ", ".join(f"'{c}'" for c in names)
    also = " or an operation has no defined result (such as 0/0)" if ops else ""
    return (
        f"column {cols} has missing values{also} in {count:,} {rows} used by this expression "
        "(handle them with isnull() or where())"
    )


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``name`` (for 'did you mean' hints), or ``None``."""
    hit = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return hit[0] if hit else None
