"""What a cell says about itself, read and rewritten with ``ast``.

Pure functions over the cell's source: which variables it sets to a
constant and loops over, what role a variable plays (a batch or an input
size), and the cell rewritten (a batch edited, micro-batches, backward per
term).  Nothing here runs the cell.
"""

from __future__ import annotations

import ast
from typing import Any

__all__ = [
    "accumulation_cell",
    "assigned_line",
    "backward_per_micro_batch",
    "edit_in_cell",
    "edit_in_cell_source",
    "loop_variables",
    "method_callers",
    "override_assignments",
    "variable_role",
]


def override_assignments(source: str, overrides: dict[str, Any]) -> tuple[ast.Module, dict[str, int]]:
    """Parse ``source`` and replace the constant of every top-level ``name = <constant>``
    whose name is in ``overrides``.  Returns the tree and {name: 1-based line edited}."""
    tree = ast.parse(source)
    edited: dict[str, int] = {}
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        value = getattr(node, "value", None)
        if not isinstance(value, ast.Constant):
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id in overrides:
                setattr(node, "value", ast.copy_location(ast.Constant(overrides[target.id]), value))  # noqa: B010
                edited[target.id] = node.lineno
    return tree, edited


def assigned_line(source: str | None, name: str) -> tuple[int, str] | None:
    """The (1-based line, text) where the cell sets ``name`` to a constant at its top level."""
    if not source:
        return None
    try:
        _, edited = override_assignments(source, {name: 0})
    except SyntaxError:
        return None
    line = edited.get(name)
    if line is None:
        return None
    return line, source.splitlines()[line - 1]


def loop_variables(source: str | None) -> set[str]:
    """Names a cell binds as ``for`` targets (``for bs in [128, 512, 2048]:``)."""
    try:
        tree = ast.parse(source or "")
    except SyntaxError:
        return set()
    return {
        name.id
        for node in ast.walk(tree)
        if isinstance(node, (ast.For, ast.comprehension))
        for name in ast.walk(node.target)
        if isinstance(name, ast.Name)
    }


def edit_in_cell(suggestion: Any, source: str | None, raw_cell: str | None) -> None:
    """A new value for a variable the cell sets itself goes where the cell sets it.

    ``bs = 4096`` pasted into a cell of its own would be overwritten by the
    cell's own ``bs = 8192``: the snippet is then the cell with that line
    edited (or, for a long cell, the edited line and where it goes).
    """
    name = suggestion.params.get("variable")
    value = suggestion.params.get("value")
    if not isinstance(name, str) or value is None or suggestion.kind == "gradient_accumulation":
        return  # accumulation's snippet is the whole cell rewritten already
    found = assigned_line(source, name)
    if found is None:
        return
    number, _ = found
    lines = (raw_cell if raw_cell is not None else source or "").splitlines()
    if not 0 < number <= len(lines) or name not in lines[number - 1]:
        return
    old = lines[number - 1]
    indent = old[: len(old) - len(old.lstrip())]
    new = f"{indent}{name} = {value!r}"
    lines[number - 1] = new
    suggestion.params["cell_line"] = number
    suggestion.detail += f" The cell sets it on its line {number}: `{old.strip()}` becomes `{new.strip()}`."
    suggestion.apply = "replace_cell"
    if len(lines) <= 30:
        suggestion.code = "\n".join(lines)
    else:
        suggestion.code = f"# line {number} of the cell, instead of: {old.strip()}\n{new}"


def method_callers(source: str | None, method: str) -> list[str]:
    """The variables the cell calls ``method`` on (``opt`` for ``opt.step()``), in the order they appear."""
    try:
        tree = ast.parse(source or "")
    except SyntaxError:
        return []
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == method
        and isinstance(node.func.value, ast.Name)
    ]
    calls.sort(key=lambda node: (node.lineno, node.col_offset))
    return [node.func.value.id for node in calls]  # type: ignore[attr-defined]


def edit_in_cell_source(source: str, name: str, value: Any) -> str:
    """``source`` with the line where it sets ``name`` to a constant setting it to ``value``."""
    found = assigned_line(source, name)
    if found is None:
        return source
    number, old = found
    lines = source.splitlines()
    indent = old[: len(old) - len(old.lstrip())]
    lines[number - 1] = f"{indent}{name} = {value!r}"
    return "\n".join(lines)


_BATCH_KEYWORDS = {"batch_size", "bs", "per_device_train_batch_size", "per_device_eval_batch_size", "num_samples"}
_LENGTH_KEYWORDS = {"max_length", "max_new_tokens", "seq_len", "size", "height", "width", "resolution", "num_tokens"}


def variable_role(cell_source: str | None, name: str) -> str:
    """Whether ``name`` is a batch (``"batch"``) or a length/resolution (``"input"``), by its use in the cell.

    A ``batch_size=``-like argument makes a batch and a ``max_length=``-like
    one an input size; then the variable's name (``bs_eval``, ``seq_len``);
    then its place: the first size of a tensor factory
    (``torch.randn(n, 3, 224, 224)``) or a slice of the first dimension is a
    batch, a later size (an image's height) an input size.
    """
    votes = {"batch": 0, "input": 0}
    named = {"batch": 0, "input": 0}
    try:
        tree = ast.parse(cell_source or "")
    except SyntaxError:
        tree = ast.Module(body=[], type_ignores=[])

    def is_name(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == name

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            sizes = node.args
            if len(sizes) == 1 and isinstance(sizes[0], (ast.Tuple, ast.List)):
                sizes = list(sizes[0].elts)
            for position, arg in enumerate(sizes):
                if is_name(arg):
                    votes["batch" if position == 0 else "input"] += 1
            for keyword_arg in node.keywords:
                if is_name(keyword_arg.value) and keyword_arg.arg:
                    if keyword_arg.arg in _BATCH_KEYWORDS:
                        named["batch"] += 1
                    elif keyword_arg.arg in _LENGTH_KEYWORDS:
                        named["input"] += 1
        elif isinstance(node, ast.Subscript):
            first = node.slice.elts[0] if isinstance(node.slice, ast.Tuple) and node.slice.elts else node.slice
            if isinstance(first, ast.Slice) and (is_name(first.upper) if first.upper else False):
                votes["batch"] += 1
    # An argument named for its role says most, then the variable's own name,
    # then where it stands among a factory's sizes.
    if named["batch"] != named["input"]:
        return "batch" if named["batch"] > named["input"] else "input"
    lowered = name.lower()
    if "batch" in lowered or lowered in ("bs", "b", "n") or lowered.startswith(("bs_", "n_samples")):
        return "batch"
    if any(word in lowered for word in ("len", "seq", "token", "res", "height", "width", "size", "pixel", "img")):
        return "input"
    if votes["batch"] != votes["input"]:
        return "batch" if votes["batch"] > votes["input"] else "input"
    return "input"


def accumulation_cell(cell_source: str, name: str, micro: int, steps: int, sets_it: bool) -> str | None:
    """The cell as ``steps`` micro-batches of ``micro`` with one optimizer step: gradient accumulation.

    The cell's top-level ``X.backward()`` becomes ``(X / accumulation_steps).backward()``
    inside a loop, and its ``opt.step()`` / ``zero_grad()`` move after it.  None
    where the cell is not shaped that way (no top-level backward and step).
    """
    try:
        tree = ast.parse(cell_source)
    except SyntaxError:
        return None

    def call_of(node: ast.stmt, attr: str) -> ast.Call | None:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            func = node.value.func
            if isinstance(func, ast.Attribute) and func.attr == attr:
                return node.value
        return None

    body: list[ast.stmt] = []
    update: list[ast.stmt] = []
    backward = 0
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
        ):
            node.value = ast.Constant(micro)  # the cell sets the batch itself
        if call_of(node, "step") is not None or call_of(node, "zero_grad") is not None:
            update.append(node)
            continue
        call = call_of(node, "backward")
        if call is not None and isinstance(call.func, ast.Attribute) and not call.args:
            scaled = ast.BinOp(left=call.func.value, op=ast.Div(), right=ast.Name("accumulation_steps", ast.Load()))
            call.func.value = scaled
            backward += 1
        body.append(node)
    if backward != 1 or not any(call_of(n, "step") is not None for n in update):
        return None
    loop = ast.For(
        target=ast.Name("micro_step", ast.Store()),
        iter=ast.Call(ast.Name("range", ast.Load()), [ast.Name("accumulation_steps", ast.Load())], []),
        body=body,
        orelse=[],
    )
    head: list[ast.stmt] = [ast.parse(f"accumulation_steps = {steps}").body[0]]
    if not sets_it:
        head.append(ast.parse(f"{name} = {micro}").body[0])
    module = ast.Module(body=[*head, loop, *update], type_ignores=[])
    ast.fix_missing_locations(module)
    return ast.unparse(module)


def backward_per_micro_batch(cell_source: str) -> tuple[str, str] | None:
    """A loss summed over a loop, then one ``backward()``: every micro-batch's graph stays
    alive until then.  Returns (the variable, the cell with ``backward()`` on each term
    inside the loop), or None where the cell is not shaped that way."""
    try:
        tree = ast.parse(cell_source)
    except SyntaxError:
        return None
    total = None
    for node in tree.body:
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr == "backward"
            and isinstance(node.value.func.value, ast.Name)
            and not node.value.args
        ):
            total = node.value.func.value.id
            backward_node = node
    if total is None:
        return None
    changed = False
    for loop in tree.body:
        if not isinstance(loop, (ast.For, ast.While)):
            continue
        body: list[ast.stmt] = []
        for stmt in loop.body:
            term = None
            if isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add):
                if isinstance(stmt.target, ast.Name) and stmt.target.id == total:
                    term = stmt.value
            elif (
                isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)
                and stmt.targets[0].id == total
                and isinstance(stmt.value, ast.BinOp)
                and isinstance(stmt.value.op, ast.Add)
                and isinstance(stmt.value.left, ast.Name)
                and stmt.value.left.id == total
            ):
                term = stmt.value.right
            if term is None:
                body.append(stmt)
                continue
            body.extend(
                ast.parse(
                    f"micro_loss = {ast.unparse(term)}\nmicro_loss.backward()\n{total} += micro_loss.detach()"
                ).body
            )
            changed = True
        loop.body = body
    if not changed:
        return None
    tree.body = [node for node in tree.body if node is not backward_node]
    ast.fix_missing_locations(tree)
    return total, ast.unparse(tree)
