"""Sequence layouts of the generator: which embedding sits at each position, and the attention mask.

Both modes use a layout of exactly block_size positions in which output j predicts code j (no shift):

* vanilla AR: [cls, t0, ..., t_{N-2}], plain causal.
* HAR (SPEC "training layout", NOTES.md quirk 15): [cls, t0..t_{A-2}] strictly causal (A = ar_tokens),
  then one group per remaining level. The group that predicts level g holds the real tokens of
  level g-1 and then mask ("special") tokens, up to the size of level g; the first group holds only
  the last AR token t_{A-1} plus mask tokens. Each group attends to itself and everything before it
  (quirk 17). The release builds a group for every level and cuts the layout to 1 + block_size - 1
  positions; building only the groups that predict something gives the same layout.

The sampler walks the same layout: one forward pass per step (`Layout.steps`), feeding exactly the
embeddings the training layout has at those positions, so training and sampling never disagree.
"""

from dataclasses import dataclass

import torch

from models.generator.config import GROUP_ORDERS, GeneratorConfig

CLS, CODE, SPECIAL = 0, 1, 2  # kinds, as in the fixtures' har_layout_kind


@dataclass(frozen=True)
class Step:
    """One sampling forward pass: positions [start, end) and where their input embeddings come from.

    In canonical order the step's inputs are [cls if has_cls, codes[code_lo:code_hi],
    special rows special_lo:special_hi]; `perm` (a tuple) reorders them into layout order, None = as is.
    """

    start: int
    end: int
    has_cls: bool
    code_lo: int
    code_hi: int
    special_lo: int
    special_hi: int
    perm: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Layout:
    kind: tuple[int, ...]  # per position: CLS, CODE or SPECIAL
    index: tuple[int, ...]  # per position: 0 (cls), code index, or special row
    block_end: tuple[int, ...]  # per position: a query at p may attend keys [0, block_end[p])
    steps: tuple[Step, ...]

    @property
    def length(self) -> int:
        return len(self.kind)

    @property
    def special_rows_used(self) -> int:
        return sum(1 for k in self.kind if k == SPECIAL)

    def attention_mask(self, device=None) -> torch.Tensor:
        """Bool (L, L), True = may attend."""
        ends = torch.tensor(self.block_end, device=device)
        return torch.arange(self.length, device=device)[None, :] < ends[:, None]

    def kind_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.kind, dtype=torch.long, device=device)

    def index_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.index, dtype=torch.long, device=device)


def har_groups(levels: list[int], ar_tokens: int) -> list[int]:
    """Sizes of the HAR groups (the levels after the next-token prefix); validates the level list."""
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"levels must be positive level sizes, got {levels}")
    if not 1 <= ar_tokens <= sum(levels):
        raise ValueError(f"ar_tokens={ar_tokens} must be in [1, {sum(levels)}] for levels {levels}")
    cum, k = 0, 0
    while cum < ar_tokens:
        cum += levels[k]
        k += 1
    if cum != ar_tokens:
        raise ValueError(
            f"ar_tokens={ar_tokens} must end on a level boundary of {levels} "
            f"(prefix sums {[sum(levels[: i + 1]) for i in range(len(levels))]})"
        )
    groups = list(levels[k:])
    prev = 1  # the first HAR group sees only the last AR token (quirk 18)
    for n in groups:
        if n < prev:
            raise ValueError(f"HAR levels must not shrink: level of {n} tokens follows {prev} ({levels})")
        prev = n
    return groups


def _interleave_slots(n_real: int, n_total: int) -> list[int]:
    """Positions of the real tokens inside a group when real and mask tokens alternate."""
    return [(i * n_total) // n_real for i in range(n_real)]


def build_layout(
    levels: list[int], ar_tokens: int, har: bool = True, group_order: str = "real_first"
) -> Layout:
    if group_order not in GROUP_ORDERS:
        raise ValueError(f"har_group_order={group_order!r}; valid: {list(GROUP_ORDERS)}")
    n_tokens = sum(levels)
    kind, index, block_end, steps = [CLS], [0], [1], [Step(0, 1, True, 0, 0, 0, 0)]
    n_ar = n_tokens if not har else ar_tokens
    groups = har_groups(levels, ar_tokens) if har else []
    # Next-token part: position p (1 <= p < n_ar) holds t_{p-1} and predicts t_p; strictly causal.
    for p in range(1, n_ar):
        kind.append(CODE)
        index.append(p - 1)
        block_end.append(p + 1)
        steps.append(Step(p, p + 1, False, p - 1, p, 0, 0))
    start, special, prev_lo, prev_hi = n_ar, 0, n_ar - 1, n_ar  # first group: only t_{A-1}
    for n in groups:
        n_real = prev_hi - prev_lo
        n_special = n - n_real
        canon = [(CODE, prev_lo + i) for i in range(n_real)] + [
            (SPECIAL, special + i) for i in range(n_special)
        ]
        if group_order == "interleaved":
            real_slots = set(_interleave_slots(n_real, n))
            order, r, s = [], 0, n_real
            for slot in range(n):
                if slot in real_slots:
                    order.append(r)
                    r += 1
                else:
                    order.append(s)
                    s += 1
            perm = tuple(order) if order != list(range(n)) else None
        else:
            perm = None
        placed = [canon[i] for i in (perm or range(n))]
        kind += [k for k, _ in placed]
        index += [i for _, i in placed]
        block_end += [start + n] * n
        steps.append(Step(start, start + n, False, prev_lo, prev_hi, special, special + n_special, perm))
        special += n_special
        prev_lo, prev_hi = start, start + n  # this group's targets are the next group's real tokens
        start += n
    assert len(kind) == n_tokens, (len(kind), n_tokens)
    return Layout(tuple(kind), tuple(index), tuple(block_end), tuple(steps))


def layout_for(cfg: GeneratorConfig) -> Layout:
    return build_layout(list(cfg.levels), cfg.ar_tokens, cfg.har, cfg.har_group_order)
