"""Quaternion rotor-gate attention and octonion attention: the references against the literal
definition, non-associativity, every backend against the float64 reference (outputs and
gradients by name), causal prefill / decode / chunked decode, grouped-query heads, strided
inputs, custom-op checks and bad input."""

import pytest
import torch
from _custom_ops import custom_op_tests, op as custom_op
from _helpers import dtype_id, need, run_isolated, WRITES_PRELUDE
from _tolerance import assert_close
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern.ops import hypercomplex_attention as ops
from geokern.reference import hypercomplex as hc
from geokern.reference import hypercomplex_attention as ref

BACKENDS = ["torch", "triton"]  # "cuda": not built for these ops (issue #20), test_bad_input
OPS = {4: geokern.quaternion_attention, 8: geokern.octonion_attention}
REFS = {4: ref.quaternion_attention, 8: ref.octonion_attention}
# (B, H, Hkv, Tq, Tk, D, causal): odd sizes, one-token decode (Tq = 1), chunked decode (Tk > Tq),
# grouped-query heads, non-causal with Tk < Tq, a head dim that is no power of two
CPU_SHAPES = [
    (1, 1, 1, 1, 1, 8, True),
    (1, 2, 1, 7, 7, 16, True),
    (2, 2, 2, 19, 23, 24, True),
    (1, 2, 2, 1, 9, 8, True),
    (1, 3, 3, 9, 4, 16, False),
]
GPU_SHAPES = [(2, 4, 2, 257, 257, 64, True), (1, 2, 2, 300, 431, 40, True)] if HAS_CUDA else []
SHAPES = CPU_SHAPES + GPU_SHAPES
DTYPES = [torch.float32, torch.bfloat16]


def _id(x):
    if isinstance(x, tuple) and len(x) == 7:
        B, H, Hkv, Tq, Tk, D, causal = x
        return f"B{B}-H{H}-KV{Hkv}-Tq{Tq}-Tk{Tk}-D{D}-{'causal' if causal else 'full'}"
    return dtype_id(x)


def qkv(shape, dtype=torch.float32):
    B, H, Hkv, Tq, Tk, D, _ = shape
    return tuple(torch.randn(*s, device=DEVICE, dtype=torch.float64).to(dtype)
                 for s in ((B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)))


def literal(n, q, k, v, causal):
    """The spec's sums written out pair by pair (float64): y_i = sum_j p_ij ((q^_i conj(k^_j)) v_j)
    for octonions, q^_i (sum_j p_ij conj(k^_j) v_j) for quaternions."""
    p, _ = ref.softmax_weights(q, k, causal)
    H = q.shape[1]
    qn, kn = ref.channels(ref.normalize_channels(q, n), n), ref.channels(ref.normalize_channels(k, n), n)
    kn, v = kn.repeat_interleave(H // k.shape[1], 1), ref.channels(v, n).repeat_interleave(H // k.shape[1], 1)
    y = torch.zeros_like(q)
    for i in range(q.shape[2]):
        for j in range(k.shape[2]):
            kb = hc.hypercomplex_conj(kn[:, :, j], n)
            if n == 4:
                t = hc.hypercomplex_mul(kb, v[:, :, j], n)
                term = hc.hypercomplex_mul(qn[:, :, i], t, n)
            else:
                term = hc.hypercomplex_mul(hc.hypercomplex_mul(qn[:, :, i], kb, n), v[:, :, j], n)
            y[:, :, i] += p[:, :, i, j, None] * term.flatten(-2)
    return y


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_is_the_literal_sum(n, causal):
    q, k, v = qkv((2, 2, 1, 5, 5, 16, causal), torch.float64)
    torch.testing.assert_close(REFS[n](q, k, v, causal), literal(n, q, k, v, causal))


def test_octonion_is_not_associative():
    """The op keeps ((q^ conj(k^)) v): the other parenthesisation differs by O(1); for quaternions
    (associative) the two agree."""
    q, k, v = qkv((1, 2, 2, 6, 6, 16, True), torch.float64)
    y = ref.octonion_attention(q, k, v)
    other = ref.octonion_attention_other_parenthesisation(q, k, v)
    assert (y - other).norm() > 0.1 * y.norm(), "octonion attention equals the other parenthesisation"
    yq = ref.quaternion_attention(q, k, v)
    qq = ref.channels(ref.normalize_channels(q, 4), 4)
    kq = ref.channels(ref.normalize_channels(k, 4), 4)
    p, _ = ref.softmax_weights(q, k, True)
    left = hc.hypercomplex_mul(qq.unsqueeze(3), hc.hypercomplex_conj(kq, 4).unsqueeze(2), 4)  # (B, H, i, j, C, 4)
    yl = torch.einsum("bhij,bhijd->bhid", p, hc.hypercomplex_mul(left, ref.channels(v, 4).unsqueeze(2), 4).flatten(-2))
    torch.testing.assert_close(yq, yl)


@pytest.mark.parametrize("backend", ["triton"])
def test_kernel_keeps_the_parenthesisation(backend):
    need(backend)
    q, k, v = qkv((1, 2, 2, 17, 17, 16, True))
    y = OPS[8](q, k, v, backend=backend).double()
    want = ref.octonion_attention(q.double(), k.double(), v.double())
    other = ref.octonion_attention_other_parenthesisation(q.double(), k.double(), v.double())
    assert (y - want).norm() < 1e-5 * want.norm()
    assert (y - other).norm() > 0.1 * want.norm()


def test_reference_is_memory_bounded(monkeypatch):
    q, k, v = qkv((1, 2, 1, 9, 9, 16, True), torch.float64)
    want = ref.octonion_attention(q, k, v)
    monkeypatch.setattr(ref, "_CHUNK_ELEMS", 50)
    torch.testing.assert_close(ref.octonion_attention(q, k, v), want)


def test_structure_constants_from_the_one_table():
    g = ref.structure_constants(8)
    a, b, c = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(torch.einsum("rstu,s,t,u->r", g, a, b, c),
                               hc.octonion_mul(hc.octonion_mul(a, b), c))
    assert set(g.unique().tolist()) == {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_matches_reference(shape, dtype, backend, n):
    need(backend)
    q, k, v = qkv(shape, dtype)
    causal = shape[6]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    y = OPS[n](*leaves, causal=causal, backend=backend)
    assert y.dtype == dtype
    l64 = [t.double().requires_grad_() for t in (q, k, v)]
    y64 = REFS[n](*l64, causal)
    lsame = [t.clone().requires_grad_() for t in (q, k, v)]
    ysame = REFS[n](*lsame, causal)
    assert_close(f"{backend} n={n} output", y, y64, ysame)
    dy = torch.randn_like(y)
    for out, ins in ((y, leaves), (y64, l64), (ysame, lsame)):
        out.backward(dy.to(out.dtype))
    for name, a, b, c in zip(("dq", "dk", "dv"), leaves, l64, lsame):
        assert_close(f"{backend} n={n} {name}", a.grad, b.grad, c.grad)


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_and_chunked_decode_match_prefill(backend, n):
    """Their causal_attn_mask: the last rows of a prefill of T tokens are what a one-token decode
    and a chunked decode (Tq = 5 new queries over the T cached keys) give."""
    need(backend)
    q, k, v = qkv((1, 2, 1, 13, 13, 16, True))
    full = OPS[n](q, k, v, backend=backend)
    one = OPS[n](q[:, :, -1:], k, v, backend=backend)
    chunk = OPS[n](q[:, :, -5:], k, v, backend=backend)
    torch.testing.assert_close(one, full[:, :, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk, full[:, :, -5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_heads_and_strided_inputs(backend, n):
    need(backend)
    q, k, v = qkv((2, 4, 2, 9, 9, 16, True))
    want = OPS[n](q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), backend=backend)
    torch.testing.assert_close(OPS[n](q, k, v, backend=backend), want, rtol=1e-5, atol=1e-5)
    # (B, T, H, D) storage seen as (B, H, T, D), as the modules pass it
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qs.is_contiguous()
    torch.testing.assert_close(OPS[n](qs, ks, vs, backend=backend), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_normalize_false(backend, n):
    need(backend)
    q, k, v = (t.requires_grad_() for t in qkv((1, 2, 1, 0, 0, 8, True)))
    y = OPS[n](q, k, v, backend=backend)
    assert y.shape == q.shape
    y.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    q, k, v = qkv((1, 1, 1, 6, 6, 16, True))
    torch.testing.assert_close(OPS[n](q, k, v, normalize=False, backend=backend).double(),
                               REFS[n](q.double(), k.double(), v.double(), True, None, False), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("scale", [None, 0.5], ids=["default-scale", "scale"])
@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_channels(backend, n, scale):
    """D = 0: an empty y and empty gradients of the inputs' shapes, with the default scale
    (1 / sqrt(0) once raised a bare ZeroDivisionError) as with an explicit one; the reference too."""
    need(backend)
    q, k, v = (torch.randn(1, 2, T, 0, device=DEVICE, requires_grad=True) for T in (3, 4, 4))
    y = OPS[n](q, k, v, scale=scale, backend=backend)
    assert y.shape == (1, 2, 3, 0), "y"
    grads = torch.autograd.grad(y.sum(), (q, k, v), allow_unused=True, materialize_grads=True)
    for name, t, g in zip("qkv", (q, k, v), grads):
        assert g.shape == t.shape, f"d{name}"
    assert REFS[n](q, k, v, True, scale).shape == (1, 2, 3, 0), "reference y"

def test_bad_input():
    q, k, v = qkv((1, 2, 1, 4, 4, 8, True))
    with pytest.raises(RuntimeError, match="#20"):
        geokern.quaternion_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="multiple of 8"):
        geokern.octonion_attention(q[..., :4], k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="q must (be 4-D|have at least 4)"):
        geokern.quaternion_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        geokern.quaternion_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="must divide"):
        geokern.quaternion_attention(q, torch.cat([k] * 3, 1), torch.cat([v] * 3, 1))
    with pytest.raises(TypeError, match="v has dtype"):
        geokern.quaternion_attention(q, k, v.double())
    with pytest.raises(TypeError, match="causal must be a bool"):
        geokern.quaternion_attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="scale"):
        geokern.octonion_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="Tk >= Tq"):
        geokern.octonion_attention(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(TypeError, match="q must have dtype"):
        geokern.quaternion_attention(q.int(), k, v)
    if _triton_ok():
        with pytest.raises(TypeError, match="float64"):
            geokern.quaternion_attention(q.double(), k.double(), v.double(), backend="triton")


def _triton_ok():
    from geokern import _backend

    return _backend.why_unavailable("triton", DEVICE) is None


def _op_samples(qualname):
    q, k, v = qkv((1, 2, 1, 9, 9, 16, True))
    qn, kn = ref.normalize_channels(q, 8), ref.normalize_channels(k, 8)
    e, et = ops._epilogue(q.device)
    if "backward" not in qualname:
        return [(q, k, v, qn, kn, e, et, True, 0.25, 8), (q, k, v, qn, kn, e, et, False, 0.25, 4)]
    y, lse = custom_op(qualname.replace("_backward", ""))(q, k, v, qn, kn, e, et, True, 0.25, 8)
    return [(torch.randn_like(y), q, k, v, qn, kn, e, et, y, lse, True, 0.25, 8)]


test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests("hypercomplex_attention_", _op_samples)


@pytest.mark.skipif(not HAS_CUDA, reason="compiling the public op with its kernels needs CUDA tensors")
@pytest.mark.parametrize("n", [4, 8])
def test_public_op_compiles_with_backward(n):
    q, k, v = (t.requires_grad_() for t in qkv((1, 2, 1, 65, 65, 16, True)))
    f = torch.compile(lambda a, b, c: OPS[n](a, b, c, backend="triton").square().sum(), fullgraph=True)
    got = torch.autograd.grad(f(q, k, v), (q, k, v))
    want = torch.autograd.grad(OPS[n](q, k, v, backend="triton").square().sum(), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=f"compiled {name}")


_WRITES = WRITES_PRELUDE + """
import geokern.kernels.hypercomplex_attention as tk
B, H, Hk, T, D = 1, 2, 1, 65, 16
t = lambda *s: torch.zeros(*s)  # noqa: E731
q, k, v, qn, kn, e, et = t(B, H, T, D), t(B, Hk, T, D), t(B, Hk, T, D), t(B, H, T, D), t(B, Hk, T, D), t(64, 64), t(64, 64)
strides = dict(zip([f"s{c}{i}" for c in "qkvab" for i in range(4)], tk._strides(q, k, v, qn, kn)))
sizes = dict(H=H, G=H // Hk, Tq=T, Tk=T, D=D, off=0, qk_scale=0.36, scale=0.25)
stats = dict(lse_ptr=t(B, H, T), delta_ptr=t(B, H, T), dy_ptr=t(B, H, T, D))
for n in (4, 8):
    meta = dict(CAUSAL=True, N=n, PREC="ieee", BLOCK_M=32, BLOCK_N=32, BLOCK_D=D, VW=D if n == 4 else 8 * D)
    ins = dict(q_ptr=q, k_ptr=k, v_ptr=v, qn_ptr=qn, kn_ptr=kn, **strides, **meta)
    kernels = {
        "fwd": (tk.hypercomplex_attention_fwd_kernel, dict(
            ins, e_ptr=e, y_ptr=t(B, H, T, D), lse_ptr=t(B, H, T), **{s: sizes[s] for s in list(sizes)[:-1]})),
        "dq": (tk.hypercomplex_attention_bwd_dq_kernel, dict(
            ins, e_ptr=e, et_ptr=et, **stats, dq_ptr=t(B, H, T, D), dqn_ptr=t(B, H, T, D), **sizes)),
        "dkdv": (tk.hypercomplex_attention_bwd_dkdv_kernel, dict(
            ins, et_ptr=et, **stats, dk_ptr=t(B, Hk, T, D), dkn_ptr=t(B, Hk, T, D), dv_ptr=t(B, Hk, T, D), **sizes)),
    }
    for name, (kernel, kw) in kernels.items():
        kw = {a: kw[a] for a in kernel.arg_names}
        if hasattr(tkw, "identify_accessed_tensors"):  # newer torch
            written = [d.name for d in tkw.identify_accessed_tensors(kernel, kw, {}).read_writes.writes]
        else:
            written = tkw.identify_mutated_tensors(kernel, kw, {})
        print(n, name, sorted(written))
"""


def test_compile_sees_the_kernels_write_only_their_outputs():
    """torch.compile clones every tensor that its analysis of a user Triton kernel's TTIR says the
    kernel writes, and writes it back into an input. The dq kernel's store offsets came from a
    helper that also loaded q, q^, dy, lse, delta and E^T (the analysis counts every argument of a
    call whose result reaches a stored-to address): those looked written, and compiling the public
    op with its backward failed on the H100 (a copy back into q, a leaf requiring grad). The TTIR
    needs no GPU."""
    pytest.importorskip("triton")
    out = run_isolated(_WRITES, timeout=300)
    for n in (4, 8):
        assert f"{n} fwd ['lse_ptr', 'y_ptr']" in out, out
        assert f"{n} dq ['dq_ptr', 'dqn_ptr']" in out, out
        assert f"{n} dkdv ['dk_ptr', 'dkn_ptr', 'dv_ptr']" in out, out
