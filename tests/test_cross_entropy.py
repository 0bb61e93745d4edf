"""The cross-entropy row kernel (CPU interpreter in CI, or CUDA) against the float64 reference:
losses and gradients, awkward shapes, ignored rows, extreme and non-finite logits, bad targets,
strided inputs, unwritten outputs; the op's registration and its use under torch.compile."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels (see conftest.py)

import pytest
import rwkv_ft.kernels.cross_entropy.triton_cross_entropy as tce
import torch
from rwkv_ft.kernels.cross_entropy import IGNORE_INDEX

from rwkv_ft.kernels import cross_entropy_rows, cross_entropy_rows_reference
from rwkv_ft.testing import assert_close

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "torch"]


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every buffer the host code allocates starts as NaN: an element the kernel never writes fails."""
    tce.POISON_OUTPUTS = True
    yield
    tce.POISON_OUTPUTS = False


def make_rows(N, V, dtype, *, scale=3.0, seed=0, ignored=(0,)):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    for i in ignored:
        if i < N:
            targets[i] = IGNORE_INDEX
    return logits.to(DEV), targets.to(DEV)


def check_against_float64(logits, targets, backend, name=""):
    loss, grad = cross_entropy_rows(logits, targets, with_grad=True, backend=backend)
    ref_loss, ref_grad = cross_entropy_rows_reference(logits.double(), targets, with_grad=True)
    assert loss.dtype == torch.promote_types(logits.dtype, torch.float32) and grad.dtype == logits.dtype
    # the loss is computed in fp32 from the given logits: fp32-tight whatever their dtype
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert_close(loss, ref_loss, acc, name=f"{name} loss")
    assert_close(grad, ref_grad, logits.dtype, name=f"{name} grad")
    return loss, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("N, V", [(1, 1), (1, 97), (5, 97), (37, 3000), (17, 4099)])
def test_loss_and_gradient_equal_float64(N, V, dtype, backend):
    """V = 3000 and 4099 take several column steps with a partial last one (2,048 columns a step
    under the interpreter, 4,096 on a GPU), N = 37 and 17 a partial last block of rows."""
    logits, targets = make_rows(N, V, dtype)
    loss, grad = check_against_float64(logits, targets, backend, f"{dtype} {N}x{V}")
    if N > 0 and targets[0] == IGNORE_INDEX:
        assert loss[0] == 0 and (grad[0] == 0).all()  # an ignored row: no loss, no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_softmax_minus_onehot(backend):
    """Each scored row's gradient sums to 0 and is -1 + p at the target (independent of the reference)."""
    logits, targets = make_rows(6, 300, torch.float32, ignored=())
    _, grad = cross_entropy_rows(logits, targets, with_grad=True, backend=backend)
    assert_close(grad.double().sum(1), torch.zeros(6, dtype=torch.float64), torch.float32, rel=1.0, name="row sums")
    assert (grad.gather(1, targets.unsqueeze(1)) < 0).all()
    others = grad.clone().scatter_(1, targets.unsqueeze(1), 0.0)
    assert (others >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_gradient_only_the_loss(backend):
    logits, targets = make_rows(9, 500, torch.bfloat16)
    loss, grad = cross_entropy_rows(logits, targets, backend=backend)
    assert grad is None
    assert_close(loss, cross_entropy_rows_reference(logits.double(), targets)[0], torch.float32, name="loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extreme_logits(dtype, backend):
    """Logits far from 0 (the max is subtracted), one dominating logit per row, a spread over the
    dtype's range (fp16: up to 60,000), and rows whose target's probability underflows."""
    big = 6e4 if dtype == torch.float16 else 1e4
    logits, targets = make_rows(8, 700, torch.float64, scale=1.0, seed=3)
    logits = logits.cpu()
    logits[1] += big  # far from 0
    logits[2] -= big
    logits[3, 5] = big  # one logit dominates: the target's probability underflows to 0
    logits[4] *= big / 10  # wide spread
    logits[5, :] = -big  # all equal
    logits = logits.to(dtype).to(DEV)
    check_against_float64(logits, targets, backend, str(dtype))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN and inf: expected here
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_and_bad_targets_give_nan_not_a_crash(backend):
    """A NaN or +inf logit makes its row's loss non-finite (the training's NaN check stops there), a
    row of -inf too; a target outside [0, V) gives NaN instead of an out-of-bounds read; an ignored
    row stays 0 whatever its logits."""
    logits, targets = make_rows(7, 50, torch.float32, ignored=())
    logits[0, 3] = float("nan")
    logits[1, 4] = float("inf")
    logits[2, :] = float("-inf")
    targets[3], targets[4] = 50, -1  # out of range
    logits[5, 7] = float("nan")
    targets[5] = IGNORE_INDEX
    loss, grad = cross_entropy_rows(logits, targets, with_grad=True, backend=backend)
    assert not torch.isfinite(loss[:5]).any()
    assert loss[5] == 0 and (grad[5] == 0).all()
    assert_close(loss[6:], cross_entropy_rows_reference(logits[6:].double(), targets[6:])[0], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V, W", [(97, 128), (3001, 3008), (50, 2100)])
def test_padding_columns_take_no_part_and_get_zero_gradient(V, W, dtype, backend):
    """With num_classes = V < W (a head padded for aligned matmuls), the loss and the first V
    gradient columns are those of the first V columns alone, whatever the padding holds, and the
    padding's gradient is exactly 0 (W = 2100 takes a column step past V under the interpreter)."""
    logits, targets = make_rows(13, W, dtype)
    targets = targets.clamp(max=V - 1)
    logits[:, V:] = 50.0  # would dominate the softmax if it were counted
    loss, grad = cross_entropy_rows(logits, targets, with_grad=True, num_classes=V, backend=backend)
    assert grad.shape == (13, W) and (grad[:, V:] == 0).all()
    ref_loss, ref_grad = cross_entropy_rows_reference(logits[:, :V].double(), targets, with_grad=True)
    assert_close(loss, ref_loss, torch.float32, name="loss")
    assert_close(grad[:, :V], ref_grad, dtype, name="grad")
    targets[1] = V  # a target in the padding is out of range: NaN, and still no gradient there
    loss, grad = cross_entropy_rows(logits, targets, with_grad=True, num_classes=V, backend=backend)
    assert torch.isnan(loss[1]) and (grad[:, V:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits(backend):
    """Rows of a wider buffer (row stride > V), and a transposed view (column stride > 1)."""
    wide, targets = make_rows(11, 260, torch.bfloat16)
    check_against_float64(wide[:, :200], targets.clamp(max=199), backend, "row stride")
    tall, _ = make_rows(200, 11, torch.bfloat16, seed=1)
    check_against_float64(tall.t(), targets.clamp(max=199), backend, "transposed")


@pytest.mark.parametrize("bad, message", [
    (lambda x, t: (x[0], t), "logits must be"),
    (lambda x, t: (x, t[:-1]), "targets must be"),
    (lambda x, t: (x, t.float()), "integer class indices"),
])  # fmt: skip
def test_bad_arguments_are_named(bad, message):
    logits, targets = make_rows(4, 10, torch.float32)
    with pytest.raises(ValueError, match=message):
        cross_entropy_rows(*bad(logits, targets))
    with pytest.raises(ValueError, match="backend"):
        cross_entropy_rows(logits, targets, backend="cuda")
    with pytest.raises(ValueError, match="num_classes"):
        cross_entropy_rows(logits, targets, num_classes=11)


def test_op_registration():
    """torch.library.opcheck: schema, fake implementation, AOT dispatch."""
    logits, targets = make_rows(5, 97, torch.bfloat16)
    for with_grad in (False, True):
        for num_classes in (97, 90):
            args = (logits, targets.clamp(max=num_classes - 1), with_grad, num_classes)
            torch.library.opcheck(torch.ops.rwkv_ft.cross_entropy_rows.default, args)


def test_meta_tensors_give_shapes():
    loss, grad = cross_entropy_rows(
        torch.empty(6, 40, dtype=torch.bfloat16, device="meta"),
        torch.empty(6, dtype=torch.long, device="meta"),
        with_grad=True,
    )
    assert loss.shape == (6,) and loss.dtype == torch.float32 and grad.shape == (6, 40) and grad.is_meta


def test_auto_takes_the_kernel_on_cuda_and_meta_only(monkeypatch):
    """ "auto" on CPU tensors runs the reference, even under the interpreter (which would take ~1 s a
    call at a 65,536-word vocabulary in every CPU training test)."""
    import rwkv_ft.kernels.cross_entropy.cross_entropy as dispatch

    kernel_calls = []
    op = dispatch.cross_entropy_rows_op
    monkeypatch.setattr(dispatch, "cross_entropy_rows_op", lambda *a: kernel_calls.append(a[0].device.type) or op(*a))
    logits, targets = make_rows(4, 50, torch.float32)
    cross_entropy_rows(logits.cpu(), targets.cpu(), with_grad=True)
    assert kernel_calls == []
    cross_entropy_rows(torch.empty(4, 50, device="meta"), torch.empty(4, dtype=torch.long, device="meta"))
    assert kernel_calls == ["meta"]
    if torch.cuda.is_available():
        cross_entropy_rows(logits.cuda(), targets.cuda())
        assert kernel_calls == ["meta", "cuda"]


def test_compiles_as_one_opaque_node():
    """Inside a fullgraph-compiled function the op is one node and gives the eager call's bits."""
    logits, targets = make_rows(9, 130, torch.bfloat16)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def f(x, t):
        return cross_entropy_rows(x * 2, t, with_grad=True, backend="triton")

    eager = f(logits, targets)
    compiled = torch.compile(f, fullgraph=True, backend=backend)(logits, targets)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
    targets_seen = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert targets_seen & {"rwkv_ft.cross_entropy_rows", "rwkv_ft.cross_entropy_rows.default"}
