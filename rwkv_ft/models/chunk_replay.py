"""Long-context training under CUDA graphs: a chunk that runs without autograd in the forward and
again, with it, in the backward (`RwkvForCausalLMBase._chunked_loss` with blocks compiled in
`reduce-overhead` mode).

A chunked step recomputes every chunk but the last in its backward. `torch.utils.checkpoint`
(non-reentrant) does that inside autograd's saved-tensor hooks, and CUDA graph trees cannot replay
compiled blocks there (pytorch/pytorch#154306: the recording sees an input freed that the replay
does not). So under CUDA graphs a chunk is an `autograd.Function` in the style of the reentrant
checkpoint instead:
- forward: the chunk under no_grad (the blocks' inference graphs); only its inputs are kept;
- backward: the chunk again with grad (the training graphs), then `torch.autograd.backward` from
  its loss and outgoing state, which accumulates the parameters' gradients and gives the incoming
  state's.
Every chunk is then a CUDA-graph generation of its own (`cudagraph_mark_step_begin` before it). A
replay reuses the memory of the previous generation's outputs, so what outlives a chunk is copied
out of it: the outgoing state, the incoming state's gradient, and the parameters' gradients, which
get device buffers before the first backward (`allocate_grads`) so that autograd adds into them
instead of adopting a graph's output as the gradient.

The dropout masks of the replay are those of the first run (the RNG state is restored, as
torch.utils.checkpoint does), and so is autocast. As with the reentrant checkpoint, the parameters'
gradients land in `.grad` (`loss.backward()`), not in what `torch.autograd.grad` returns. Not for
DDP, FSDP or ZeRO: their gradient hooks expect one accumulation per parameter and step, and the
nested backward makes one per chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch


def allocate_grads(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Zero gradients for the trained parameters that have none yet, in the caching allocator's
    ordinary memory: autograd then adds every chunk's share into them in place."""
    for p in parameters:
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


class _RandomState:
    """The CPU and device RNG states and the autocast settings at a chunk's first run, to replay it
    identically (dropout masks, autocast dtypes)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_rng = torch.get_rng_state()
        self.device_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.autocast = {
            kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in {"cpu", device.type}
        }

    def replay(self):
        """A context that runs under the recorded RNG states and autocast settings, and leaves the
        caller's RNG states as they were."""
        stack = contextlib.ExitStack()
        devices = [self.device] if self.device_rng is not None else []
        stack.enter_context(torch.random.fork_rng(devices=devices, device_type=self.device.type))
        torch.set_rng_state(self.cpu_rng)
        if self.device_rng is not None:
            torch.cuda.set_rng_state(self.device_rng, self.device)
        for kind, (enabled, dtype) in self.autocast.items():
            stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
        return stack


class ReplayedChunk(torch.autograd.Function):
    """`ReplayedChunk.apply(run, graphs, piece, targets, reset, state, anchor) -> (loss_sum, state)`,
    the result of `run(piece, targets, reset, state)`, with the gradient of that call computed by
    running it again in the backward. `graphs`: the blocks replay CUDA graphs (mark a generation
    before each run, copy out what outlives it). `anchor`: an empty tensor that requires grad, so
    that the backward runs even when no other input needs a gradient (the first chunk of LoRA
    training: the parameters' gradients come from that backward)."""

    @staticmethod
    def forward(ctx, run: Callable, graphs: bool, piece, targets, reset, state, anchor):
        ctx.run, ctx.graphs = run, graphs
        ctx.random = _RandomState(piece.device)
        ctx.save_for_backward(piece, targets, reset, state)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss_sum, state_out = run(piece, targets, reset, state)
        if graphs:
            state_out = state_out.clone()  # the next replay of the blocks reuses its memory
        return loss_sum, state_out

    @staticmethod
    def backward(ctx, grad_loss, grad_state):
        piece, targets, reset, state = ctx.saved_tensors
        if ctx.graphs:
            grad_state = None if grad_state is None else grad_state.clone()
            torch.compiler.cudagraph_mark_step_begin()
        inputs = [x.detach().requires_grad_() if x is not None and x.requires_grad else x for x in (piece, state)]
        with torch.enable_grad(), ctx.random.replay():
            loss_sum, state_out = ctx.run(inputs[0], targets, reset, inputs[1])
        pairs = [
            (o, g) for o, g in ((loss_sum, grad_loss), (state_out, grad_state)) if g is not None and o.requires_grad
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [None if x is None or not x.requires_grad else x.grad for x in inputs]
        if ctx.graphs:
            grads = [None if g is None else g.clone() for g in grads]
        return None, None, grads[0], None, None, grads[1], None


def replayed_chunk(
    run: Callable, graphs: bool, piece: torch.Tensor, targets: torch.Tensor, reset, state
) -> tuple[torch.Tensor, torch.Tensor]:
    """`run(piece, targets, reset, state)` -> (loss_sum, state), recomputed in the backward (see the
    module docstring)."""
    anchor = torch.empty(0, device=piece.device, requires_grad=True)
    return ReplayedChunk.apply(run, graphs, piece, targets, reset, state, anchor)
