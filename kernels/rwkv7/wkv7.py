"""Public entry point of the RWKV-7 WKV operator: validation and backend dispatch.

The Triton backend lives in `triton_wkv7.py`, called through the custom ops of `ops.py` (opaque to
torch.compile); triton is imported on the first launch, so CPU-only use never imports it. The
"torch" backend runs `chunked.py` (16 tokens per step), or the per-token reference for sequences
shorter than a chunk (a generation step), where padding to a chunk would cost more.
"""

from __future__ import annotations

import torch

from rwkv_ft.kernels.custom_ops import runs_kernel

from .chunked import CHUNK, wkv7_chunked
from .ops import wkv7_op
from .reference import wkv7_reference

_BACKENDS = ("auto", "triton", "torch")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_HEAD_SIZES = (32, 64, 128)
_NAMES = ("r", "w", "k", "v", "a", "b")


def _check_inputs(tensors, state, reset) -> None:
    r = tensors[0]
    if r.dim() != 4:
        raise ValueError(f"wkv7: r must be (B, T, H, N), got shape {tuple(r.shape)}")
    B, T, H, N = r.shape
    if T < 1:
        raise ValueError("wkv7: the sequence must hold at least one token (T >= 1)")
    for name, x in zip(_NAMES, tensors):
        if x.shape != r.shape:
            raise ValueError(f"wkv7: {name} shape {tuple(x.shape)} != r shape {tuple(r.shape)}")
        if x.dtype != r.dtype and not (name == "w" and x.dtype == torch.float32):
            raise ValueError(f"wkv7: {name} dtype {x.dtype} != r dtype {r.dtype} (only w may be fp32 instead)")
    if not r.is_floating_point():
        raise ValueError(f"wkv7: inputs must be floating point, got {r.dtype}")
    if state is not None and tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"wkv7: state must be (B, H, N, N) = ({B}, {H}, {N}, {N}), got {tuple(state.shape)}")
    if reset is not None:
        if tuple(reset.shape) != (B, T):
            raise ValueError(f"wkv7: reset must be (B, T) = ({B}, {T}), got {tuple(reset.shape)}")
        if reset.dtype != torch.bool:
            raise ValueError(f"wkv7: reset must be a bool tensor, got {reset.dtype}")
    others = (state, reset)
    devices = {t.device for t in (*tensors, *(x for x in others if x is not None))}
    if len(devices) > 1:
        raise ValueError(f"wkv7: all tensors must be on one device, got {sorted(map(str, devices))}")


def wkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    reset: torch.Tensor | None = None,
    backend: str = "auto",
    recompute_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7 WKV over a whole sequence.

    Per head, with S the (N, N) state in BlinkDL's [value, key] layout:
    ``S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T`` and ``y_t = S_t r_t``
    (the model passes ``a = -kk`` and ``b = kk * a_gate``).

    Args:
        r, w, k, v, a, b: (B, T, H, N), all fp32, bf16 or fp16 (one dtype; ``w`` may be fp32 with
            the others in bf16/fp16, so that the decay loses nothing). ``w`` is the log of the
            per-step decay (<= 0): the model passes ``-exp(w_raw)``. Any T >= 1, B, H.
        state: None (zeros) or (B, H, N, N) fp32, the state before the first token.
        reset: None or (B, T) bool; where true the state is zeroed before that token (packed
            examples in one row).
        backend: "auto" (Triton on CUDA, and the kernel op's shape-only implementation on meta
            tensors; plain PyTorch elsewhere), "triton" or "torch" (plain PyTorch, 16 tokens a
            step with batched matmuls in between: any device, dtype and head size).
        recompute_states: Triton backend, in training: keep nothing for the backward but the
            inputs (and ``state``), and run the forward again in the backward, instead of keeping
            the fp32 state entering every 16-token chunk from forward to backward (1 KB per token
            and head at N = 64; the backward then costs one more forward scan and chunk-map pass).
            Same results. The model sets it under selective activation recompute.

    Returns:
        y: (B, T, H, N) in the inputs' dtype; new_state: (B, H, N, N) fp32, the state after the
        last token. All accumulation is fp32.

    Differentiable w.r.t. all six inputs and ``state``; the loss may depend on ``new_state``.
    "triton" on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"wkv7: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    tensors = (r, w, k, v, a, b)
    _check_inputs(tensors, state, reset)
    if backend == "auto":
        use_triton = (r.is_cuda or r.is_meta) and r.dtype in _KERNEL_DTYPES and r.shape[-1] in _KERNEL_HEAD_SIZES
        backend = "triton" if use_triton else "torch"
    if backend == "torch":
        torch_impl = wkv7_chunked if r.shape[1] >= CHUNK else wkv7_reference
        return torch_impl(*tensors, state, reset)
    if r.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"wkv7: the triton backend takes fp32, bf16 or fp16 inputs, got {r.dtype}")
    if r.shape[-1] not in _KERNEL_HEAD_SIZES:
        raise ValueError(f"wkv7: the triton backend takes head size N in {_KERNEL_HEAD_SIZES}, got {r.shape[-1]}")
    if not runs_kernel(r):
        raise RuntimeError(
            "wkv7: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 (set before triton is "
            "imported) to run on CPU under the Triton interpreter"
        )
    return wkv7_op(*tensors, state, reset, recompute_states)
