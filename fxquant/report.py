"""What happened to every linear the passes saw."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LinearRecord:
    name: str
    in_features: int
    out_features: int
    scheme: str
    bytes_before: int
    bytes_after: int
    status: str  # "quantized" | "skipped"
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def format_report(records: list[LinearRecord]) -> str:
    """A fixed-width table of the records plus a totals line."""
    cols = ("name", "in", "out", "scheme", "before", "after", "status", "reason")
    rows = [(r.name, str(r.in_features), str(r.out_features), r.scheme, _mb(r.bytes_before),
             _mb(r.bytes_after), r.status, r.reason) for r in records]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    quantized = [r for r in records if r.status == "quantized"]
    before = sum(r.bytes_before for r in quantized)
    after = sum(r.bytes_after for r in quantized)
    out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append(f"{len(quantized)}/{len(records)} linears quantized; their weights "
               f"{_mb(before)} -> {_mb(after)}")
    return "\n".join(out)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}MB"
