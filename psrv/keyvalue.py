"""The one KEY=VALUE parser: ``-o``/``-t`` options on every command, and ``NAME:KEY=VALUE,...``
specs such as ``--down-compressor topk:ratio=0.05``. Pure (no click), so the core can use it."""

from __future__ import annotations

from collections.abc import Iterable

#: options whose value may be a name: KEY -> the names, each standing for its index (options travel as
#: numbers). ``-o topology=ring`` is ``-o topology=0`` (psrv.decentralized.TOPOLOGIES, kept equal by a test)
NAMED_VALUES: dict[str, tuple[str, ...]] = {
    "topology": ("ring", "torus", "exponential", "full"),
    # the cat / alistarh compressors (psrv.cat.BASES, COST_MODELS, SIZE_UNITS, kept equal by a test)
    "base": ("topk", "sq", "stochastic"),
    "cost": ("payload", "affine", "packet"),
    "size": ("payload_bits", "wire_bytes"),
}
#: ``cost_file=PATH``: a cost model JSON (psrv.cat.cost_options_from_file) expanded to cat's options
FILE_KEYS = ("cost_file",)


def parse_key_values(items: Iterable[str]) -> dict[str, float]:
    """``["a=1", "b=2.5"]`` -> ``{"a": 1.0, "b": 2.5}``; anything else is a ``ValueError``. A key of
    :data:`NAMED_VALUES` also takes one of its names (``topology=ring`` -> 0.0)."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        names = NAMED_VALUES.get(key.strip().rpartition(".")[2], ())  # ALGORITHM.KEY too
        if sep and key.strip().rpartition(".")[2] in FILE_KEYS:
            from psrv.cat import cost_options_from_file

            prefix = key.strip().rpartition(".")[0]
            for k, v in cost_options_from_file(value.strip()).items():
                out[f"{prefix}.{k}" if prefix else k] = v
            continue
        if sep and value.strip() in names:
            out[key.strip()] = float(names.index(value.strip()))
            continue
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            hint = f" (or {key.strip()}={'|'.join(names)})" if names else ""
            raise ValueError(f"expected KEY=NUMBER{hint}, got {item!r}") from None
    return out


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``"topk:ratio=0.01,k=0"`` -> ``("topk", {"ratio": 0.01, "k": 0.0})`` (``ValueError`` if malformed)."""
    name, _, rest = spec.partition(":")
    if not name.strip():
        raise ValueError(f"no name in {spec!r}")
    try:
        return name.strip(), parse_key_values(filter(None, (x.strip() for x in rest.split(","))))
    except ValueError as exc:
        raise ValueError(f"{exc} in {spec!r}") from None
