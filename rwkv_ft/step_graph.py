"""A training micro-step, forward to the loss and backward to the trained parameters' gradients,
recorded as one CUDA graph and replayed (`training.compile: step-graph`).

Why: with CUDA graphs per block (`reduce-overhead`) every block call still runs Python on the host:
dynamo's guards (~80 per LoRA-adapted Linear) and the graph tree's bookkeeping, ~0.5 ms a call on an
H100's host, about what the GPU spends on a block's forward at RWKV-4 7.6B, batch 1, with whole-block
checkpointing. One graph per micro-step costs the host one input copy and one replay, however deep
the model; the blocks inside compile without graphs of their own (inductor's fused kernels), and the
optimizer step stays outside. On an H100's fast host the per-block graphs had kept up: the step
gained 0.6% at 7.6B and 1.3% at 1.6B (benchmarks/NOTES.md, "Twentieth session"). Where the host is
slow enough that the per-block calls bound the step, the gain would be larger (not measured).

What is recorded is exact for what it records: one graph per input signature (tensor shapes and
dtypes), captured on the `warmup + 1`-th batch of that signature, replayed for every later one, the
batch copied into the graph's own input tensors first. A batch the graph cannot stand for runs
eagerly instead (`eager_reason` says why): packed rows (`position_ids`: where a row restarts is a
host decision), or a mask with padding that is not right padding before ignored labels. Right
padding whose labels are ignored is dropped from the mask: a pad only follows a row's real tokens,
so it changes nothing they see. Gradients are returned the way `backward()` would leave them:
assigned where a parameter has none, added where it has one (gradient accumulation).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from rwkv_ft.kernels.cross_entropy import IGNORE_INDEX
from rwkv_ft.models.modeling_utils import check_token_ids

LossFn = Callable[[dict[str, Any]], torch.Tensor]
logger = logging.getLogger(__name__)


class StepGraphs:
    """`step(inputs)`: the loss of `loss_fn(inputs)` (detached), with the gradients of `parameters`
    accumulated into their `.grad` as `loss.backward()` would, from a CUDA graph per input signature.

    Args:
        loss_fn: inputs (a dict of tensors and plain values) -> scalar loss. Must not wait on the GPU
            (no `.item()`, no data-dependent branch): it is recorded once and replayed.
        parameters: the trained parameters (requires_grad); the graph computes their gradients only.
        warmup: eager runs of each signature before it is recorded (compilation, autotuning, lazy
            initialisation happen there, on a side stream as CUDA graph capture requires).
        max_graphs: signatures recorded at most; later new ones run eagerly (each graph keeps its own
            input and gradient tensors; all share one memory pool for the rest).
        vocab_size: checked against `input_ids` before each replay (the model's own check waits on
            the GPU, so it is skipped while recording).
        recorder: records a function's GPU work and replays it (default: CUDA graphs sharing one
            memory pool); tests pass one that re-runs the function instead.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        parameters: Iterable[torch.nn.Parameter],
        *,
        warmup: int = 2,
        max_graphs: int = 8,
        vocab_size: int | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.loss_fn = loss_fn
        self.parameters = [p for p in parameters if p.requires_grad]
        if not self.parameters:
            raise ValueError("StepGraphs: no trained parameters (none requires grad)")
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.vocab_size = vocab_size
        self.recorder = recorder or CudaGraphRecorder()
        self.graphs: dict[tuple, _RecordedStep] = {}
        self.seen: dict[tuple, int] = {}
        self.owned: set[int] = set()  # ids of the gradient tensors the graphs write
        self.eager_reason: str | None = None  # why the last step ran eagerly, or None
        self.reasons_logged: set[str] = set()

    def __call__(self, inputs: dict[str, Any]) -> torch.Tensor:
        inputs = dict(inputs)
        if self.vocab_size is not None and isinstance(inputs.get("input_ids"), torch.Tensor):
            check_token_ids(inputs["input_ids"], self.vocab_size)
        self.eager_reason = graphable(inputs)
        if self.eager_reason is None:
            inputs.pop("attention_mask", None)  # none, or right padding before ignored labels: not needed
            key = signature(inputs)
            recorded = self.graphs.get(key)
            if recorded is None:
                self.seen[key] = self.seen.get(key, 0) + 1
                if self.seen[key] > self.warmup and len(self.graphs) < self.max_graphs:
                    recorded = self.graphs[key] = self._record(inputs)
                elif self.seen[key] > self.warmup:
                    self.eager_reason = f"more than {self.max_graphs} input signatures (max_graphs)"
            if recorded is not None:
                return recorded.run(inputs, self.owned)
        if self.eager_reason is not None and self.eager_reason not in self.reasons_logged:
            self.reasons_logged.add(self.eager_reason)
            logger.warning("step-graph: a micro-step runs without its CUDA graph: %s", self.eager_reason)
        return self._eager(inputs, side_stream=self.eager_reason is None)

    # -- eager runs --------------------------------------------------------------------------------

    def _eager(self, inputs: dict[str, Any], side_stream: bool) -> torch.Tensor:
        """One eager micro-step; a warm-up runs on a side stream, as capture requires of the work it
        initialises (cuBLAS workspaces, the autograd engine's streams)."""
        context = _side_stream() if side_stream and self.parameters[0].is_cuda else contextlib.nullcontext()
        with context:
            loss = self.loss_fn(inputs)
            grads = torch.autograd.grad(loss, self.parameters, allow_unused=True)
            accumulate(self.parameters, grads)
        return loss.detach()

    # -- recorded runs -----------------------------------------------------------------------------

    def _record(self, inputs: dict[str, Any]) -> _RecordedStep:
        static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

        def micro_step():
            loss = self.loss_fn(static)
            return loss, torch.autograd.grad(loss, self.parameters, allow_unused=True)

        replay, (loss, grads) = self.recorder(micro_step)
        # A parameter's `.grad` that is one of these must be copied out before the next replay overwrites it.
        self.owned.update(id(g) for g in grads if g is not None)
        return _RecordedStep(replay, static, loss, grads, self.parameters)


Recorder = Callable[[Callable[[], Any]], tuple[Callable[[], None], Any]]


class CudaGraphRecorder:
    """`recorder(fn) -> (replay, outputs)`: `fn`'s GPU work captured in a CUDA graph (not run), its
    outputs the tensors each `replay()` rewrites. Every graph of one recorder shares one memory pool:
    only one micro-step runs at a time, and each graph's outputs stay allocated."""

    def __init__(self) -> None:
        self.pool = None

    def __call__(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # thread_local: another thread's CUDA calls (a DataLoader's pin-memory thread) do not break the capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = fn()
        # The eager warm-ups' cached blocks would stay reserved beside the graph's own pool.
        torch.cuda.empty_cache()
        return graph.replay, outputs


class _RecordedStep:
    def __init__(self, replay, static: dict[str, Any], loss: torch.Tensor, grads, parameters) -> None:
        self.replay, self.static, self.loss, self.grads, self.parameters = replay, static, loss, grads, parameters

    def run(self, inputs: dict[str, Any], owned: set[int]) -> torch.Tensor:
        # A gradient still aliasing a graph's output (gradient accumulation) becomes its own first.
        for p in self.parameters:
            if p.grad is not None and id(p.grad) in owned:
                p.grad = p.grad.clone()
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                self.static[key].copy_(value, non_blocking=True)
        self.replay()
        accumulate(self.parameters, self.grads)
        return self.loss.detach().clone()  # the recorded loss tensor is overwritten by the next replay


def accumulate(parameters: list[torch.nn.Parameter], grads) -> None:
    """`.grad` as `backward()` leaves it: the new gradient where there was none (the tensor itself,
    no copy, when it has the parameter's strides; else a copy in the parameter's layout, as autograd
    makes: the optimizer's and the clipping's reductions then run in the same order as after
    `backward()`), the sum where there was one."""
    existing, added = [], []
    for p, g in zip(parameters, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
        else:
            existing.append(p.grad)
            added.append(g)
    if existing:
        torch._foreach_add_(existing, added)


def graphable(inputs: dict[str, Any]) -> str | None:
    """None if a recorded graph can stand for this batch, else why not."""
    if inputs.get("position_ids") is not None:
        return "packed rows (position_ids): where a row restarts is decided on the host"
    mask, labels = inputs.get("attention_mask"), inputs.get("labels")
    if mask is None:
        return None
    mask = mask.bool()
    if labels is None:
        return "an attention mask without labels"
    right_padded = (mask[:, 1:] <= mask[:, :-1]).all()
    pads_ignored = (labels.masked_fill(mask, IGNORE_INDEX) == IGNORE_INDEX).all()
    if not bool(right_padded & pads_ignored):  # one host sync
        return "padding other than right padding with ignored labels"
    return None


def signature(inputs: dict[str, Any]) -> tuple:
    """What a graph is recorded for: every tensor's shape, dtype and device, every other value."""
    return tuple(
        (k, tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else (k, v)
        for k, v in sorted(inputs.items())
    )


@contextlib.contextmanager
def _side_stream():
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)
