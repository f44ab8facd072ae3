"""The data sampler check: the indices a rank reads, recomputed from what the process group
says it is.

A ``DistributedSampler`` decides each rank's shard from attributes any code in the process
can set (``rank``, ``num_replicas``, ``seed``, ``shuffle``, ``epoch``) and from its own
``__iter__``, which can be replaced. The guard finds the sampler behind the DataLoader it is
given (``Guard(..., loader=loader)``) and puts a thin proxy in its ``BatchSampler``'s place
of the sampler (the one object the loader iterates; the job's own reference to the sampler,
for ``set_epoch``, stays the same object). Each time the loader starts an epoch the proxy
takes the indices the sampler yields and compares them with the shard recomputed
independently here from the seed, shuffle and drop_last seen when the guard started, the
sampler's current epoch, the world size and the rank of the process group (``ctx.rank``,
never the sampler's own ``rank``). It also counts the indices drawn, which every rank must
draw alike.

No class of the job's is changed and nothing is left behind: ``restore`` puts the sampler
back when the guard closes. A loader without a ``BatchSampler`` over a
``DistributedSampler`` is not checked this way (the batch digests still are).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shard:
    """The settings that decide a rank's indices, as the guard expects them."""

    rank: int
    replicas: int
    seed: int
    shuffle: bool
    drop_last: bool

    def indices(self, length: int, epoch: int) -> list[int]:
        """The indices ``DistributedSampler`` yields for these settings (its documented
        algorithm, recomputed here so that a replaced ``__iter__`` cannot vouch for
        itself)."""
        return self.order(length, epoch)[self.rank :: self.replicas]

    def order(self, length: int, epoch: int) -> list[int]:
        """Every rank's indices, interleaved: rank r reads ``order[r::replicas]``."""
        if self.drop_last and length % self.replicas:
            per_rank = math.ceil((length - self.replicas) / self.replicas)
        else:
            per_rank = math.ceil(length / self.replicas)
        total = per_rank * self.replicas
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order: list[int] = torch.randperm(length, generator=generator).tolist()
        else:
            order = list(range(length))
        if self.drop_last:
            order = order[:total]
        elif order:
            padding = total - len(order)
            order += (order * math.ceil(padding / len(order)))[:padding]
        return order[:total]


def settings(sampler: Any) -> tuple[int, int, int, bool, bool, int, int]:
    """(rank, replicas, seed, shuffle, drop_last, dataset length, epoch) of a live sampler."""
    return (
        int(sampler.rank),
        int(sampler.num_replicas),
        int(sampler.seed),
        bool(sampler.shuffle),
        bool(sampler.drop_last),
        len(sampler.dataset),
        int(sampler.epoch),
    )


class _Verified:
    """Stands where the BatchSampler reads its sampler: yields what the sampler yields,
    after handing the epoch's indices to the check."""

    def __init__(self, inner: Any, watch: SamplerWatch) -> None:
        self.inner = inner
        self._watch = watch

    def __iter__(self) -> Iterator[Any]:
        indices = list(iter(self.inner))
        self._watch.verify(indices)
        for index in indices:
            self._watch.drawn += 1
            yield index

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    # code that asks whether the loader's sampler is a DistributedSampler (accelerate,
    # Lightning) still gets yes: isinstance() consults __class__
    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self.inner)


class SamplerWatch:
    """Finds a ``DistributedSampler`` behind a DataLoader and checks what it yields.

    ``problems`` collects what was seen (one line each, with details) for the detector to
    report at the next check: the proxy runs inside the job's DataLoader, where nothing
    may be raised."""

    def __init__(
        self, loader: Any, rank: int, world: int, fault: Callable[[str, BaseException], None]
    ):
        from torch.utils.data import DistributedSampler

        self.rank = rank
        self.world = world
        self.fault = fault
        self.drawn = 0
        self.problems: list[tuple[str, dict[str, Any]]] = []
        #: the settings differ from the expected shard's now, or the last epoch's indices
        #: did: evidence on every row while it lasts (its alert is raised once)
        self.altered = False
        self._yielded_wrong = False
        self.sampler: Any = None
        self.expected: Shard | None = None
        self._batches: Any = None
        self._seen: set[str] = set()
        self.own_group = True
        batches: Any = getattr(loader, "batch_sampler", None)
        inner = getattr(batches, "sampler", None)
        if not isinstance(inner, DistributedSampler):
            return
        self.sampler = inner
        rank_now, replicas, seed, shuffle, drop_last, _, _ = settings(inner)
        # a sampler over another group than the guard's (data parallel inside a larger
        # world): its rank cannot be derived here, only held to what it was at start
        self.own_group = replicas == world
        self.expected = Shard(
            rank if self.own_group else rank_now, replicas, seed, shuffle, drop_last
        )
        self._batches = batches
        batches.sampler = _Verified(inner, self)

    @property
    def active(self) -> bool:
        return self.expected is not None

    def _problem(self, key: str, text: str, details: dict[str, Any]) -> None:
        if key not in self._seen:
            self._seen.add(key)
            self.problems.append((text, details))

    def check_settings(self) -> None:
        """The sampler's attributes against the expected shard (at each check: a change
        is seen before the next epoch uses it)."""
        if self.expected is None:
            return
        rank, replicas, seed, shuffle, drop_last, _, _ = settings(self.sampler)
        want = self.expected
        changed = [
            f"{name} {now!r} (expected {then!r})"
            for name, now, then in (
                ("rank", rank, want.rank),
                ("num_replicas", replicas, want.replicas),
                ("seed", seed, want.seed),
                ("shuffle", shuffle, want.shuffle),
                ("drop_last", drop_last, want.drop_last),
            )
            if now != then
        ]
        self.altered = bool(changed) or self._yielded_wrong
        if changed:
            self._problem(
                "settings:" + ";".join(changed),
                "the data sampler's settings were changed: " + ", ".join(changed),
                {"changed": changed},
            )

    def verify(self, indices: list[Any]) -> None:
        """The epoch's indices against the recomputed shard (never raises)."""
        try:
            self._verify(indices)
        except Exception as exc:
            self.fault("the data sampler check", exc)

    def _verify(self, indices: list[Any]) -> None:
        if self.expected is None:
            return
        length, epoch = len(self.sampler.dataset), int(self.sampler.epoch)
        want = self.expected.indices(length, epoch)
        self._yielded_wrong = indices != want
        self.altered = self.altered or self._yielded_wrong
        if indices == want:
            return
        differ = sum(a != b for a, b in zip(indices, want, strict=False)) + abs(
            len(indices) - len(want)
        )
        details: dict[str, Any] = {
            "epoch": epoch,
            "differ": differ,
            "of": len(want),
            "expected_rank": self.expected.rank,
        }
        whose = ""
        if self.own_group:
            order = self.expected.order(length, epoch)
            for other in range(self.world):
                if other != self.expected.rank and indices == order[other :: self.world]:
                    whose = f"; they are rank {other}'s shard"
                    details["reads_rank"] = other
                    break
        self._problem(
            f"indices:{epoch}",
            f"the data sampler yields other indices than rank {self.expected.rank}'s shard "
            f"(epoch {epoch}: {differ} of {len(want)} differ{whose})",
            details,
        )

    def digest(self) -> tuple[int, ...]:
        """What every rank's sampler must share: replicas, seed, shuffle, drop_last, the
        dataset's length and the epoch (not the rank)."""
        if self.expected is None:
            return ()
        _, replicas, seed, shuffle, drop_last, length, epoch = settings(self.sampler)
        return (replicas, seed, int(shuffle), int(drop_last), length, epoch)

    def restore(self) -> None:
        """Put the sampler back where the loader reads it."""
        if self._batches is not None and isinstance(self._batches.sampler, _Verified):
            self._batches.sampler = self.sampler
        self._batches = None
