"""Rewrite a single-input Einsum that only permutes axes as a Transpose.

The exporter lowers an unpatchify such as `torch.einsum("nhwpqc->nchpwq", x)` to an ONNX
`Einsum`. ONNX's Einsum schema has no bfloat16 (its type constraint stops at fp16/fp32/fp64), so
a bf16 graph fails strict shape inference and the checker there, and every dim after it is
unknown to the lint. A permutation is a `Transpose(perm)`, defined for every dtype, exact (pure
data movement), and what TensorRT maps to one shuffle layer instead of its generic einsum.

A single-input equation is a permutation when every input label appears once and exactly once
in the output: no repeated label (a diagonal), no label missing from the output (a sum). The
implicit form (no `->`) is supported with ONNX's rule (output = the labels that appear once,
sorted, after the ellipsis). An ellipsis is supported when the input rank is known and the
output keeps it; anything else is left as it is, with the reason logged at debug level.
"""

from __future__ import annotations

__all__ = [
    "NotAPermutation",
    "RewritePermutationEinsumPass",
    "einsum_permutation",
    "require_no_permutation_einsum",
]

import logging
import string

import onnx_ir as ir

from shiva_export.errors import StaticGraphError

logger = logging.getLogger(__name__)

_LABELS = frozenset(string.ascii_letters)
_ELLIPSIS = "..."


class NotAPermutation(ValueError):
    """The equation is valid Einsum but not a pure axis permutation, or cannot be decided."""


def _split_term(term: str, where: str) -> list[str]:
    """Labels of one term, with the ellipsis as one item '...'."""
    if term.count(_ELLIPSIS) > 1:
        raise NotAPermutation(f"{where} {term!r} has more than one ellipsis")
    items: list[str] = []
    rest = term
    while rest:
        if rest.startswith(_ELLIPSIS):
            items.append(_ELLIPSIS)
            rest = rest[len(_ELLIPSIS):]
        elif rest[0] in _LABELS:
            items.append(rest[0])
            rest = rest[1:]
        else:
            raise NotAPermutation(f"{where} {term!r} has a character {rest[0]!r} that is not a label")
    return items


def einsum_permutation(equation: str, rank: int | None = None) -> tuple[int, ...]:
    """The Transpose `perm` equivalent to a single-input Einsum `equation`.

    Args:
        equation: the Einsum `equation` attribute, e.g. "nhwpqc->nchpwq" (spaces are ignored).
        rank: rank of the input; needed only when the equation has an ellipsis.

    Returns:
        perm such that `Transpose(x, perm) == Einsum(x)` (output axis i is input axis perm[i]).

    Raises:
        NotAPermutation: more than one input, a repeated or summed label, an output label not in
            the input, a malformed term, or an ellipsis whose extent is unknown (no `rank`) or
            that the output drops.
    """
    compact = "".join(equation.split())
    if compact.count("->") > 1:
        raise NotAPermutation(f"equation {equation!r} has more than one '->'")
    lhs, arrow, rhs = compact.partition("->")
    if "," in lhs:
        raise NotAPermutation(f"equation {equation!r} has more than one input")
    inputs = _split_term(lhs, "input term")
    labels = [item for item in inputs if item != _ELLIPSIS]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise NotAPermutation(f"equation {equation!r} repeats {''.join(repeated)!r} (a diagonal)")
    if arrow:
        outputs = _split_term(rhs, "output term")
    else:  # ONNX implicit mode: the ellipsis first, then the labels that appear once, sorted
        outputs = ([_ELLIPSIS] if _ELLIPSIS in inputs else []) + sorted(labels)
    if len(set(outputs)) != len(outputs):
        raise NotAPermutation(f"equation {equation!r} repeats an output label")
    missing_in = [item for item in outputs if item not in inputs]
    if missing_in:
        raise NotAPermutation(f"equation {equation!r}: output {''.join(missing_in)!r} is not in the input")
    summed = [item for item in inputs if item not in outputs]
    if summed:
        raise NotAPermutation(f"equation {equation!r} sums over {''.join(summed)!r}")

    # Input axes of each item: labels take one axis, the ellipsis the rest of the rank.
    if _ELLIPSIS in inputs:
        if rank is None:
            raise NotAPermutation(f"equation {equation!r} has an ellipsis and the input rank is unknown")
        covered = rank - len(labels)
        if covered < 0:
            raise NotAPermutation(f"equation {equation!r} names {len(labels)} axes; the input has rank {rank}")
    else:
        covered = 0
        if rank is not None and rank != len(labels):
            raise NotAPermutation(f"equation {equation!r} names {len(labels)} axes; the input has rank {rank}")
    axes: dict[str, list[int]] = {}
    position = 0
    for item in inputs:
        width = covered if item == _ELLIPSIS else 1
        axes[item] = list(range(position, position + width))
        position += width
    return tuple(axis for item in outputs for axis in axes[item])


def _is_einsum(node: ir.Node) -> bool:
    return node.op_type == "Einsum" and node.domain in ("", "ai.onnx")


def _label(node: ir.Node) -> str:
    if node.name:
        return node.name
    output = node.outputs[0].name if node.outputs else None
    return f"{node.op_type} -> {output}" if output else node.op_type


def _input_rank(node: ir.Node) -> int | None:
    data = node.inputs[0] if node.inputs else None
    return None if data is None or data.shape is None else len(data.shape)


def _permutation_of(node: ir.Node) -> tuple[int, ...] | None:
    """perm of a single-input permutation Einsum, or None (with the reason at debug level)."""
    if len(node.inputs) != 1 or node.inputs[0] is None:
        return None
    equation = node.attributes.get_string("equation")
    if equation is None:
        return None
    try:
        return einsum_permutation(equation, _input_rank(node))
    except NotAPermutation as reason:
        logger.debug("%s: left as Einsum: %s", _label(node), reason)
        return None


def _rewrite(node: ir.Node, perm: tuple[int, ...]) -> None:
    graph = node.graph
    assert graph is not None, "RewritePermutationEinsumPass: Einsum node is not attached to a graph"
    (data,), (output,) = node.inputs, node.outputs
    transpose = ir.node("Transpose", [data], {"perm": list(perm)}, name=f"{node.name or 'Einsum'}/transpose")
    result = transpose.outputs[0]
    dtype = output.dtype if output.dtype is not None else data.dtype
    if dtype is not None:  # an untyped intermediate stays untyped (shape inference fills it later)
        result.dtype = dtype
        if data.shape is not None:
            result.shape = ir.Shape([data.shape[axis] for axis in perm])
        elif output.shape is not None:
            result.shape = output.shape
    graph.insert_before(node, transpose)
    name = output.name
    ir.convenience.replace_all_uses_with(output, result, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    result.name = name  # graph outputs and debugging tools bind by name
    logger.debug("%s: Einsum %r -> Transpose perm=%s", _label(transpose), node.attributes.get_string("equation"),
                 list(perm))


def _iter_einsum(model: ir.Model) -> list[ir.Node]:
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if _is_einsum(n)]


class RewritePermutationEinsumPass(ir.passes.InPlacePass):
    """Replace every single-input Einsum that only permutes axes by an exact Transpose.

    Einsum has no bfloat16 in ONNX (bf16 graphs then fail shape inference), and Transpose is
    the cheaper, TensorRT-native op for every dtype. Einsums that contract, sum, take a diagonal,
    or whose ellipsis extent is unknown are left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rewritten = 0
        for node in _iter_einsum(model):
            perm = _permutation_of(node)
            if perm is None:
                continue
            _rewrite(node, perm)
            rewritten += 1
        logger.debug("RewritePermutationEinsumPass: %d Einsum node(s) rewritten", rewritten)
        return ir.passes.PassResult(model, modified=bool(rewritten))

    def ensures(self, model: ir.Model) -> None:
        require_no_permutation_einsum(model)


def require_no_permutation_einsum(model: ir.Model) -> None:
    """Raise StaticGraphError naming every Einsum that is still a plain axis permutation."""
    offenders = [f"'{_label(node)}' ({node.attributes.get_string('equation')!r})"
                 for node in _iter_einsum(model) if _permutation_of(node) is not None]
    if offenders:
        raise StaticGraphError(
            f"permutation Einsum remains: {', '.join(offenders)}; expected a Transpose (Einsum has "
            "no bfloat16 in ONNX). Run RewritePermutationEinsumPass after every pass that adds one."
        )
