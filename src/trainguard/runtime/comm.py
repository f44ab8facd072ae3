"""Collectives as the guard sees them: time spent waiting, and the gradients they produced.

All ranks leave a collective together, so wall step times are equal; the waiting is what
differs: a slow rank waits little, its peers wait for it. The guard observes
``torch.distributed.all_reduce`` (through which DDP's gradient buckets go with PyTorch's
stock comm hook, which it registers when the model has none, and through which jobs
average gradients by hand): the time each call takes and, on sampled steps, what each
*gradient* all-reduce produced. Just before ``optimizer.step`` the gradients must be those
results, up to one positive factor (clipping by norm, unscaling a loss scale).

What counts, and what does not:

* a gradient all-reduce is one called from DDP's stock hooks, or one whose tensor is a
  parameter's ``.grad``; a loss or metric all-reduced for logging is neither;
* only the last result per buffer counts: with gradient accumulation (with or without
  ``no_sync``) each micro-batch reduces the same buckets again, and the last result is
  what the gradients hold;
* when the recorded results do not cover every gradient (a job that reduces a flattened
  copy), the step is not compared: unchecked, never guessed at.

On the same sampled steps each gradient all-reduce (a sum over the whole world) is also
measured *before* the reduction: this rank's contribution's moments, and its dot product
with the result over a strided sample of coordinates whose offset the guard draws under
its key. :class:`StepGrads` holds them for the step; ``grad_check`` compares them across
ranks.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

#: the other collectives a job waits in (DDP's buffer broadcast before every forward among
#: them): timed only, so that waiting for a slow peer there is not counted as work
_TIMED = (
    "broadcast",
    "_broadcast_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "barrier",
)
#: DDP's stock comm hooks (allreduce, fp16/bf16 compression) live here
_HOOK_FILE = os.path.join("distributed", "algorithms", "ddp_comm_hooks", "default_hooks.py")
#: how many callers up DDP's hook is looked for
_HOOK_DEPTH = 4
#: coordinates of each reduced buffer sampled, before and after, on sampled steps
SAMPLE = 1024


@dataclass
class _Result:
    """One gradient all-reduce of a sampled step: its result's moments and, when it was a
    sum over the whole world measured before, this rank's part in it."""

    numel: int
    reduced: Any  # moments of the result
    before: Any = None  # moments of this rank's tensor before the reduction
    dots: Any = None  # (before . result, before . before, result . result) on the sample


@dataclass
class StepGrads:
    """A sampled step's gradient all-reduces, summed over buffers (tensors on the device
    until the caller resolves them). ``before`` and ``dots`` are None when some reduction
    was not a world sum measured before; ``used`` is None when the results do not cover
    every gradient."""

    reduced: Any
    before: Any
    dots: Any
    used: Any


class CommTimer:
    """Wraps ``dist.all_reduce``; see the module docstring."""

    def __init__(self, model: Any, sample_now: Callable[[], bool] = lambda: False) -> None:
        import torch.distributed as dist

        self._wait = 0.0
        #: seconds of the sensor's own work on sampled steps: its reads before each
        #: all-reduce (in the job's backward) and the CPU time of its reads of the result
        #: (on the collective's thread), until taken
        self._own = 0.0
        self._lock = threading.Lock()
        #: notified when the last sampled result's completion callback has run
        self._settled = threading.Condition(self._lock)
        self.sample_now = sample_now
        self.in_backward = True  # between a step's start and its optimizer.step
        self.params: Sequence[Any] = ()
        self._reduced: dict[tuple[int, int], _Result] = {}
        #: sampled results whose completion callback has not run yet (see grads_changed)
        self._pending = 0
        #: the offset of the sampled coordinates in a buffer of ``numel`` elements sampled
        #: every ``stride`` (the guard's keyed draw; 0 until one is set)
        self.offset: Callable[[int, int], int] = lambda numel, stride: 0
        #: the latest sampled step's gradients, until taken
        self.sampled: StepGrads | None = None
        #: called with (where, error) when the wrappers' own bookkeeping fails: the
        #: collective itself is the job's and is never held up or changed by it
        self.on_fault: Callable[[str, BaseException], None] = lambda where, exc: None
        #: a collective this rank took part in failed (closing.py: peers that died)
        self.failed = False
        self.active = dist.is_available() and dist.is_initialized()
        if not self.active:
            return
        register = getattr(model, "register_comm_hook", None)
        if register is not None:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            # the stock hook: DDP's buckets then go through dist.all_reduce, which we
            # observe; a model with a hook of its own raises here and keeps it
            with contextlib.suppress(RuntimeError, ValueError, TypeError):
                register(state=None, hook=allreduce_hook)
        self._original = dist.all_reduce
        dist.all_reduce = self._all_reduce
        self._timed: dict[str, Any] = {}
        for name in _TIMED:
            original = getattr(dist, name, None)
            if original is not None:
                self._timed[name] = original
                setattr(dist, name, self._timing(original))

    def _timing(self, original: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            work = original(*args, **kwargs)
            self._after(work, started, None)
            return work

        timed.__wrapped__ = original  # type: ignore[attr-defined]
        return timed

    def _is_gradient(self, tensor: Any) -> bool:
        import sys

        # DDP's hook a few frames up: a wrapper put around dist.all_reduce after ours
        # (which sees the call first) does not hide that the call is a gradient bucket's
        frame: Any = sys._getframe(2)
        for _ in range(_HOOK_DEPTH):
            if frame is None:
                break
            if frame.f_code.co_filename.endswith(_HOOK_FILE):
                return True
            frame = frame.f_back
        pointer = tensor.data_ptr()
        return any(p.grad is not None and p.grad.data_ptr() == pointer for p in self.params)

    def _all_reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            sample = self.in_backward and self.sample_now() and self._is_gradient(tensor)
        except Exception as exc:
            sample = False
            self.on_fault("the all-reduce sensor", exc)
        before = None
        if sample:
            try:
                before = self._before(tensor, args, kwargs)
            except Exception as exc:
                self.on_fault("the all-reduce sensor", exc)
            with self._lock:
                self._own += time.perf_counter() - started
        work = self._original(tensor, *args, **kwargs)
        self._after(work, started, tensor if sample else None, before)
        return work

    def _before(self, tensor: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """This rank's contribution to a world sum: its moments and a strided sample of
        coordinates (copied: the collective overwrites the tensor). None for another
        reduction (a maximum, a subgroup), where the result is not the ranks' sum."""
        import torch.distributed as dist

        op = kwargs.get("op", args[0] if args else dist.ReduceOp.SUM)
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        if op != dist.ReduceOp.SUM or dist.get_world_size(group) != dist.get_world_size():
            return None
        flat = tensor.detach().reshape(-1)
        stride = max(1, -(-flat.numel() // SAMPLE))  # spread over the whole buffer
        start = self.offset(flat.numel(), stride) % stride
        return moments(flat), flat[start::stride][:SAMPLE].clone(), start, stride

    def _after(self, work: Any, started: float, reduced: Any, before: Any = None) -> None:
        """Book the collective's time (and result) when it completes; never raises."""
        try:
            if work is not None and hasattr(work, "get_future"):
                counted = reduced is not None
                if counted:
                    with self._lock:
                        self._pending += 1
                work.get_future().then(
                    lambda fut: self._done(started, reduced, before, counted, _failed(fut))
                )
            else:
                self._done(started, reduced, before)
        except Exception as exc:
            self.on_fault("the all-reduce sensor", exc)

    def _done(
        self,
        started: float,
        reduced: Any,
        before: Any = None,
        counted: bool = False,
        failed: bool = False,
    ) -> None:
        try:
            if failed:
                # a peer gone, a timeout: closing then looks a moment longer for dead peers
                self.failed = True
            else:
                self._book(started, reduced, before)
        finally:
            if counted:
                with self._lock:
                    self._pending = max(0, self._pending - 1)
                    if not self._pending:
                        self._settled.notify_all()

    def _book(self, started: float, reduced: Any, before: Any) -> None:
        try:
            waited = time.perf_counter() - started
            result = None
            if reduced is not None:
                cpu = time.thread_time()
                result = _Result(reduced.numel(), moments(reduced))
                if before is not None:
                    sums, part, start, stride = before
                    import torch

                    now = reduced.detach().reshape(-1)[start::stride][:SAMPLE].to(torch.float64)
                    part = part.to(torch.float64)
                    result.before = sums
                    result.dots = torch.stack([part.dot(now), part.dot(part), now.dot(now)])
            with self._lock:
                self._wait += waited
                if result is not None:
                    self._own += time.thread_time() - cpu
                    # the latest result per buffer: accumulation reduces the same buckets again
                    self._reduced[(reduced.data_ptr(), reduced.numel())] = result
        except Exception as exc:
            self.on_fault("the all-reduce sensor", exc)

    def grads_changed(self, params: Sequence[Any]) -> str | None:
        """On a sampled step: are the gradients about to be used what the all-reduces
        produced, up to one positive factor? Compares (sum, sum of absolute values, sum of
        squares) in float64; one sync. None when they are, or when it cannot tell."""
        # the completion callbacks run on the collective's own thread, possibly after the
        # job (DDP) has waited for the work: wait for them briefly, so that every rank reads
        # the results of all its buckets (else ranks would digest different sets)
        with self._lock:
            # woken by the last callback (polling would add a sleep's granularity)
            self._settled.wait_for(lambda: not self._pending, timeout=_CALLBACK_WAIT)
            late, self._pending = self._pending, 0  # given up on: never wait for them again
            reduced, self._reduced = self._reduced, {}
        if not reduced or late:
            return None  # results missing: unchecked, not compared
        import torch

        results = list(reduced.values())
        total = torch.stack([r.reduced for r in results]).sum(0)
        step = StepGrads(total, None, None, None)
        self.sampled = step
        if all(r.dots is not None for r in results):
            step.before = torch.stack([r.before.to(total.device) for r in results]).sum(0)
            step.dots = torch.stack([r.dots.to(total.device) for r in results]).sum(0)
        grads = [p.grad for p in params if p.grad is not None]
        if sum(r.numel for r in results) != sum(g.numel() for g in grads):
            return None  # some gradients were reduced out of sight: unchecked
        used = torch.zeros(3, dtype=torch.float64, device=total.device)
        groups: dict[tuple[Any, Any], list[Any]] = {}
        for grad in grads:
            groups.setdefault((grad.device, grad.dtype), []).append(grad.detach().reshape(-1))
        for flats in groups.values():
            # one concatenation per device and dtype: a few ops, not a few per gradient
            used += moments(torch.cat(flats) if len(flats) > 1 else flats[0]).to(used.device)
        step.used = used
        (r_sum, r_abs, r_sq), (u_sum, u_abs, u_sq) = total.tolist(), used.tolist()
        if r_abs == 0.0:
            return None if u_abs == 0.0 else "gradients appeared after an all-reduce of zeros"
        c = u_abs / r_abs
        tol = 1e-4
        if abs(u_sq - c * c * r_sq) > tol * max(c * c * r_sq, 1e-300):
            return "gradients are not the all-reduced ones (their spread changed)"
        if abs(u_sum - c * r_sum) > tol * c * r_abs:
            return "gradients are not the all-reduced ones (their signs changed)"
        return None

    def discard(self) -> None:
        """Forget results of a step that did not reach optimizer.step (a skipped step)."""
        with self._lock:
            self._reduced = {}
        self.sampled = None

    def take_sampled(self) -> StepGrads | None:
        """The sampled step's gradients, once (None on other steps)."""
        step, self.sampled = self.sampled, None
        return step

    def take_own(self) -> float:
        with self._lock:
            own, self._own = self._own, 0.0
        return own

    def take_wait(self) -> float:
        with self._lock:
            waited, self._wait = self._wait, 0.0
        return waited

    def close(self) -> None:
        import torch.distributed as dist

        if not self.active:
            return
        if dist.all_reduce is self._all_reduce:
            dist.all_reduce = self._original
        for name, original in self._timed.items():
            if getattr(getattr(dist, name, None), "__wrapped__", None) is original:
                setattr(dist, name, original)


#: seconds grads_changed waits for sampled results' completion callbacks
_CALLBACK_WAIT = 2.0


def _failed(future: Any) -> bool:
    """Whether a completed collective's future holds an error (never raises)."""
    try:
        future.value()
    except Exception:
        return True
    return False


def moments(tensor: Any) -> Any:
    """(sum, sum of absolute values, sum of squares) of a tensor, in float64, on its device."""
    import torch

    flat = tensor.detach().reshape(-1).to(torch.float64)
    # the sum of squares as a dot product: one pass, no squared copy
    return torch.stack([flat.sum(), flat.abs().sum(), flat.dot(flat)])
