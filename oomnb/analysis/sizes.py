"""The sizes a cell's memory grows with, found without being told.

A *knob* is one number the cell's activations scale with and that the user
can change: a variable (``bs = 8192`` in the cell, or ``seq_len`` from an
earlier cell), a literal size in a tensor factory (``torch.randn(1, 3, 4096,
4096)``), or the height and width of an image (the length of token ids) the
notebook holds.  Each knob knows how a dry run changes it, and what the user
pastes to change it the same way: what is measured is what is pasted.

Whether a candidate really scales the cell's memory is not guessed: the
advisor dry-runs it at half its value first.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .cellsource import assigned_line, edit_in_cell_source, variable_role

__all__ = ["Knob", "Resized", "find_knobs"]

#: Tensor factories whose positional arguments (or one tuple of them) are sizes.
_FACTORIES = {"randn", "rand", "zeros", "ones", "empty", "full", "randint", "normal", "randperm"}
#: Keywords whose value is a size.
_SIZE_KEYWORDS = {
    "batch_size",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "num_samples",
    "max_length",
    "max_new_tokens",
    "seq_len",
    "size",
    "num_tokens",
    "height",
    "width",
    "resolution",
}
_BATCH_ARGS = {"batch_size", "per_device_train_batch_size", "per_device_eval_batch_size", "num_samples"}
_NAME_HINTS = ("batch", "bs", "len", "seq", "token", "res", "height", "width", "size", "pixel", "img", "n_samples")


@dataclass(frozen=True)
class Resized:
    """A dry-run override: the named tensor's fake copy, with another shape."""

    shape: tuple[int, ...]

    def __call__(self, fake: Any) -> Any:
        return fake.new_empty(self.shape)


@dataclass
class Knob:
    """One size the cell's memory may grow with, and how to change it."""

    #: "variable", "literal" or "tensor"
    how: str
    #: The variable's name, or the tensor's; for a literal, the literal itself.
    name: str
    value: int
    role: str  # "batch" or "input"
    #: Whether the cell itself sets the variable (``bs = 8192`` on one of its lines).
    set_in_cell: bool = False
    #: The cell's line (1-based) that sets it, where it does.
    line: int | None = None
    #: For a tensor: its shape, the dimensions scaled, and whether it holds floats.
    shape: tuple[int, ...] = ()
    dims: tuple[int, ...] = ()
    floating: bool = True
    #: Tensors of the same shape the cell reads with it (an attention mask with its ids): cut alike.
    companions: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.how == "literal":
            return f"the size {self.value} in the cell's tensors"
        if self.how == "tensor":
            return f"`{self.name}` " + ("height and width" if len(self.dims) == 2 else "length")
        return self.name

    def new_shape(self, new: int) -> tuple[int, ...]:
        scale = new / self.value
        return tuple(max(1, round(size * scale)) if i in self.dims else size for i, size in enumerate(self.shape))

    def measure(self, run_cell: Callable[..., Any], cell_source: str | None, new: int, **options: Any) -> Any:
        """A dry run of the cell with this knob at ``new``."""
        if self.how == "variable":
            return run_cell({self.name: new}, **options)
        if self.how == "literal":
            return run_cell({}, source=replace_literal(cell_source or "", self.value, new), **options)
        shape = self.new_shape(new)
        return run_cell({name: Resized(shape) for name in (self.name, *self.companions)}, **options)

    def change(self, cell_source: str | None, new: int) -> tuple[list[str], str | None]:
        """What the user runs: (lines to run first, the cell changed or None where it is unchanged)."""
        if self.how == "variable":
            if self.set_in_cell and cell_source is not None:
                return [], edit_in_cell_source(cell_source, self.name, new)
            return [f"{self.name} = {new}"], None
        if self.how == "literal":
            return [], replace_literal(cell_source or "", self.value, new)
        # The notebook's own tensor stays as it is: the cell reads a smaller copy.
        shape = self.new_shape(new)
        first = []
        renamed = cell_source or ""
        for name in (self.name, *self.companions):
            small = f"{name}_small"
            if len(self.dims) == 2 and self.floating:
                h, w = (shape[d] for d in self.dims)
                first.append(
                    f"{small} = torch.nn.functional.interpolate({name}, size=({h}, {w}), "
                    'mode="bilinear", antialias=True)'
                )
            else:
                index = ", ".join(f":{shape[d]}" if d in self.dims else ":" for d in range(len(self.shape)))
                first.append(f"{small} = {name}[{index}]")
            renamed = rename(renamed, name, small)
        return [], "\n".join([*first, renamed])

    def snippet(self, cell_source: str | None, new: int) -> tuple[str, str]:
        """(code, how it applies) for this knob alone at ``new``."""
        first, changed = self.change(cell_source, new)
        if changed is not None:
            return "\n".join([*first, changed]), "replace_cell"
        return "\n".join(first), "run_first"


def rename(source: str, old: str, new: str) -> str:
    """``source`` with the variable ``old`` read as ``new`` (not attributes, not strings, not comments)."""
    import io
    import tokenize

    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return source
    lines = source.splitlines(keepends=True)
    spots = []
    for i, tok in enumerate(tokens):
        after_dot = i > 0 and tokens[i - 1].string == "."
        if tok.type == tokenize.NAME and tok.string == old and not after_dot:
            spots.append(tok.start)
    for row, col in sorted(spots, reverse=True):
        line = lines[row - 1]
        lines[row - 1] = line[:col] + new + line[col + len(old) :]
    return "".join(lines)


def _factory_sizes(call: ast.Call) -> list[ast.expr]:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in _FACTORIES:
        return []
    args = list(call.args)
    if name == "randint":  # randint(low, high, size) / randint(high, size)
        sized = [a for a in args if isinstance(a, (ast.Tuple, ast.List))]
        return list(sized[0].elts) if sized else []
    if name == "full" and args:  # full(size, fill_value)
        args = args[:1]
    if name == "normal":
        return []
    if len(args) == 1 and isinstance(args[0], (ast.Tuple, ast.List)):
        return list(args[0].elts)
    for keyword in call.keywords:
        if keyword.arg == "size" and isinstance(keyword.value, (ast.Tuple, ast.List)):
            return list(keyword.value.elts)
    return args


def _size_uses(tree: ast.AST) -> tuple[dict[str, int], dict[int, list[int]]]:
    """{variable: how often it is used as a size}, {literal: positions it stands at in factories}."""
    names: dict[str, int] = {}
    literals: dict[int, list[int]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for position, arg in enumerate(_factory_sizes(node)):
                if isinstance(arg, ast.Name):
                    names[arg.id] = names.get(arg.id, 0) + 1
                elif isinstance(arg, ast.Constant) and type(arg.value) is int and arg.value >= 2:
                    literals.setdefault(arg.value, []).append(position)
            for keyword in node.keywords:
                if keyword.arg in _SIZE_KEYWORDS and isinstance(keyword.value, ast.Name):
                    names[keyword.value.id] = names.get(keyword.value.id, 0) + 1
                elif keyword.arg in _SIZE_KEYWORDS and _is_size(keyword.value):
                    # DataLoader(ds, batch_size=10000): a batch; max_length=4096: an input size
                    position = 0 if keyword.arg in _BATCH_ARGS else 1
                    literals.setdefault(keyword.value.value, []).append(position)  # type: ignore[attr-defined]
            for arg in node.args:  # train(model, bs): a size by its name only
                if isinstance(arg, ast.Name) and any(hint in arg.id.lower() for hint in _NAME_HINTS):
                    names[arg.id] = names.get(arg.id, 0) + 1
        elif isinstance(node, ast.Subscript):
            parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            for part in parts:
                if isinstance(part, ast.Slice) and isinstance(part.upper, ast.Name):
                    names[part.upper.id] = names.get(part.upper.id, 0) + 1
    return names, literals


def _is_size(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 2


def replace_literal(cell_source: str, old: int, new: int) -> str:
    """The cell with every size ``old`` of its tensor factories (and size keywords) made ``new``.

    Edited in the text, where the literals stand: comments, quotes and line
    breaks stay as the user wrote them.
    """
    tree = ast.parse(cell_source)
    spots: list[tuple[int, int, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            sized = list(_factory_sizes(node))
            sized += [k.value for k in node.keywords if k.arg in _SIZE_KEYWORDS]
            for arg in sized:
                same = isinstance(arg, ast.Constant) and type(arg.value) is int and arg.value == old
                if same and arg.end_lineno == arg.lineno and arg.end_col_offset is not None:
                    spots.append((arg.lineno, arg.col_offset, arg.end_col_offset))
    lines = cell_source.splitlines(keepends=True)
    for lineno, start, end in sorted(set(spots), reverse=True):
        raw = lines[lineno - 1].encode()  # ast offsets count UTF-8 bytes
        lines[lineno - 1] = (raw[:start] + str(new).encode() + raw[end:]).decode()
    return "".join(lines)


def find_knobs(
    cell_source: str | None,
    namespace_values: dict[str, Any],
    batch_var: str | None = None,
    limit: int = 4,
) -> list[Knob]:
    """The candidate sizes of a cell, most likely first.

    ``namespace_values`` holds what the cell reads from the notebook (ints and
    tensors, by name); ``batch_var`` (``--batch-var``) comes first when given.
    """
    try:
        tree = ast.parse(cell_source or "")
    except SyntaxError:
        tree = ast.Module(body=[], type_ignores=[])
    uses, literals = _size_uses(tree)
    knobs: list[Knob] = []
    seen: set[str] = set()

    def add_variable(name: str, value: Any) -> None:
        if name in seen or type(value) is not int or value < 2:
            return
        seen.add(name)
        found = assigned_line(cell_source, name)
        knobs.append(
            Knob(
                "variable",
                name,
                value,
                _role(cell_source, name),
                set_in_cell=found is not None,
                line=found[0] if found else None,
            )
        )

    if batch_var is not None:
        found = assigned_line(cell_source, batch_var)
        value = _constant_of(tree, batch_var) if found else namespace_values.get(batch_var)
        add_variable(batch_var, value)
    for name in sorted(uses, key=lambda n: -uses[n]):
        value = _constant_of(tree, name)
        add_variable(name, value if value is not None else namespace_values.get(name))
    for name, value in namespace_values.items():  # read by a function the cell calls
        if any(hint in name.lower() for hint in _NAME_HINTS):
            add_variable(name, value)
    for literal, positions in sorted(literals.items(), key=lambda item: -item[0]):
        if literal < 16 and 0 not in positions:
            continue  # channels and kernel sizes
        role = "batch" if all(p == 0 for p in positions) else "input"
        knobs.append(Knob("literal", str(literal), literal, role))
    for name, value in namespace_values.items():
        if not isinstance(value, torch.Tensor) or name in seen:
            continue
        shape = tuple(int(s) for s in value.shape)
        if value.is_floating_point() and value.dim() == 4 and min(shape[2:]) >= 128:
            knobs.append(Knob("tensor", name, max(shape[2:]), "input", shape=shape, dims=(2, 3)))
        elif not value.is_floating_point() and value.dim() == 2 and shape[1] >= 128:
            alike = tuple(
                other
                for other, v in namespace_values.items()
                if other != name and isinstance(v, torch.Tensor) and tuple(v.shape) == shape
            )
            knobs.append(
                Knob("tensor", name, shape[1], "input", shape=shape, dims=(1,), floating=False, companions=alike)
            )
    return knobs[:limit]


def _constant_of(tree: ast.Module, name: str) -> int | None:
    """The int a top-level ``name = <int>`` of the cell sets (the first one)."""
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and type(node.value.value) is int
            and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
        ):
            return int(node.value.value)
    return None


def _role(cell_source: str | None, name: str) -> str:
    return variable_role(cell_source, name)
