"""The slot-attention pass op: every fused backend that can run here (the compiled
CPU kernels; the Triton kernels on a GPU or, small shapes, under Triton's
interpreter; the CUDA kernels on a GPU) against the PyTorch twin, the ``stats``
cache, its torch.library registration, determinism, and its errors.

A pass of a level at depth D-1 runs k_in and v_in through D stages (LayerNorm d,
then times stage d's base and factors), takes the softmax over slots of
queries . k (+ attn_eps) and returns (attn [B,K,N], attn_sum [B,K], attn_v [B,K,C],
stats [B,N,D,4]); see ``exposure_slot.ops.slot_attention_pass``.

Tolerances, relative to the largest magnitude of the expected tensor:
- float64 kernel vs float64 reference: 1e-12, forward and every gradient (both are
  exact to ~1e-16 and sum in different orders);
- float32 kernel vs float64 reference on the same values: 1e-5 for the forward and
  gradients (float32 rounding through up to three LayerNorms, products of mixtures,
  a softmax and sums over ~4000 tokens; observed at most a few 1e-6; far under 1e-4);
- bfloat16 / float16 kernels (GPU backends; float32 accumulation, statistics cached
  in the input dtype) vs the float64 reference on the same (rounded) values: 3e-2 /
  4e-3 (the result and the cached statistics are rounded to 8 / 11 mantissa bits).
The ``stats`` cache must give bitwise the outputs computed without it, and the
backward must ignore it; repeated runs and runs on 1 or 2 threads agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from conftest import (backend_device, fused_backends, interpreted, low_precision_dtypes,
                      op_namespace, requires_kernels)
from exposure_slot.ops import slot_attention_pass

F64_TOL = 1e-12
F32_TOL = 1e-5
TOLERANCES = {torch.float64: F64_TOL, torch.float32: F32_TOL, torch.bfloat16: 3e-2,
              torch.float16: 4e-3}
FUSED = fused_backends()


def tokens(backend, n):
    """n, or at most 70 tokens under Triton's interpreter (still several tiles)."""
    return min(n, 70) if interpreted(backend) else n


NORM_EPS, ATTN_EPS = 1e-5, 1e-8


class Case:
    """Fresh random arguments of one pass. ``layout`` has one entry per stage:
    (has_base, [(K_j, table_batched), ...])."""

    def __init__(self, B, N, C, K, layout, *, dtype=torch.float64, seed=0):
        gen = torch.Generator().manual_seed(seed)
        rand = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
        D = len(layout)
        self.layout = layout
        self.k_in = rand(B, N, C) * 2 + 0.5
        self.v_in = rand(B, N, C) * 1.5 - 0.3
        self.norms = [1 + 0.3 * rand(D, C), 0.3 * rand(D, C), 1 + 0.3 * rand(D, C),
                      0.3 * rand(D, C)]
        self.stage_bases = [1 + 0.5 * rand(B, N, C) if has_base else None
                            for has_base, _ in layout]
        self.masks, self.tables, self.factor_stages = [], [], []
        for d, (_, factors) in enumerate(layout):
            for Kj, batched in factors:
                self.masks.append(
                    0.05 + torch.rand(B, Kj, N, generator=gen, dtype=dtype))
                self.tables.append(0.2 + rand(B if batched else 1, Kj, C))
                self.factor_stages.append(d)
        # Logits of a few units: a softmax neither uniform nor one-hot.
        self.queries = rand(B, K, C) * (2.0 / C ** 0.5)
        self.grads = (rand(B, K, N), rand(B, K), rand(B, K, C))

    def tensors(self):
        """The differentiable inputs, in the order of the gradients below."""
        return ([self.k_in, self.v_in, *self.norms]
                + [t for t in self.stage_bases if t is not None]
                + self.masks + self.tables + [self.queries])

    def with_tensors(self, tensors):
        """A shallow copy whose inputs are ``tensors`` (same order as tensors())."""
        other = object.__new__(Case)
        other.__dict__.update(self.__dict__)
        it = iter(tensors)
        other.k_in, other.v_in = next(it), next(it)
        other.norms = [next(it) for _ in range(4)]
        other.stage_bases = [None if t is None else next(it) for t in self.stage_bases]
        other.masks = [next(it) for _ in self.masks]
        other.tables = [next(it) for _ in self.tables]
        other.queries = next(it)
        return other

    def on(self, backend):
        """A copy on the backend's device."""
        device = backend_device(backend)
        copy = self.with_tensors([t.to(device) for t in self.tensors()])
        copy.grads = tuple(g.to(device) for g in self.grads)
        return copy

    def to(self, dtype):
        copy = self.with_tensors([t.to(dtype) for t in self.tensors()])
        copy.grads = tuple(g.to(dtype) for g in self.grads)
        return copy

    def run(self, backend, stats=None):
        """The outputs, computed on the backend's device (the inputs are moved there;
        a no-op on the CPU, where tests also pass leaves that require grad)."""
        device = backend_device(backend)
        on = lambda t: t if t is None or device.type == "cpu" else t.to(device)
        return slot_attention_pass(on(self.k_in), on(self.v_in), *map(on, self.norms),
                                   [on(t) for t in self.stage_bases],
                                   [on(t) for t in self.masks], [on(t) for t in self.tables],
                                   self.factor_stages, on(self.queries), on(stats), NORM_EPS,
                                   ATTN_EPS, backend=backend)

    def forward_backward(self, backend, stats=None):
        """The four outputs and the gradients of the three differentiable ones
        (weighted by self.grads) w.r.t. every input tensor, on the CPU."""
        device = backend_device(backend)
        leaves = [t.detach().to(device).requires_grad_() for t in self.tensors()]
        outputs = self.with_tensors(leaves).run(backend, stats)
        assert not outputs[3].requires_grad
        loss = sum((o * g.to(device)).sum() for o, g in zip(outputs[:3], self.grads))
        grads = torch.autograd.grad(loss, leaves)
        return [t.cpu() for t in [o.detach() for o in outputs] + list(grads)]

    def op_args(self, stats=None):
        """The compiled op's own argument layout."""
        bases = [t for t in self.stage_bases if t is not None]
        base_stages = [d for d, t in enumerate(self.stage_bases) if t is not None]
        return (self.k_in, self.v_in, *self.norms, bases, base_stages, self.masks, self.tables,
                self.factor_stages, self.queries, stats, NORM_EPS, ATTN_EPS)


def assert_matches(actual, expected, rel):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def assert_identical(results_a, results_b):
    for a, b in zip(results_a, results_b, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- parity

F, T = False, True
PARITY = [  # B, N, C, K, layout
    (1, 1, 16, 3, [(F, [])]),
    # One stage without modulation: the CPU kernel folds its LayerNorm into the
    # attention and reads whole tiles of rows in place (C a multiple of 32), copies
    # of the rest (the last tile of a chunk; C = 48); its backward is folded too
    # (every slot count from one to four groups of four, tiles short of 16 tokens).
    (3, 1031, 128, 10, [(F, [])]),
    (2, 100, 48, 5, [(F, [])]),
    (1, 300, 128, 1, [(F, [])]),
    (3, 71, 32, 16, [(F, [])]),
    (3, 2, 64, 7, [(T, [])]),
    (1, 97, 128, 16, [(F, [(3, F)])]),
    (3, 257, 256, 1, [(T, [(3, T), (7, F)])]),
    (3, 1031, 16, 7, [(F, [(3, F)]), (F, [])]),
    (1, 257, 64, 3, [(F, [(3, F)]), (T, [])]),
    (3, 97, 256, 16, [(T, []), (T, [(7, T), (10, F), (3, F)])]),
    (1, 1031, 128, 1, [(F, []), (F, [(2, F)])]),
    (3, 257, 16, 10, [(F, [(3, F)]), (T, [(7, F), (3, T)]), (F, [])]),
    (3, 1031, 128, 3, [(T, [(3, F)]), (T, [(7, F)]), (T, [(10, T)])]),
    (1, 2, 64, 7, [(F, []), (F, []), (F, [])]),
    (3, 1, 256, 16, [(F, [(3, F), (3, T), (16, F)]), (F, []), (T, [(1, F)])]),
    (1, 1031, 256, 7, [(F, [(3, F)]), (F, [(7, F), (3, F)]), (F, [])]),
]


def case_id(B, N, C, K, layout):
    stages = "_".join(("b" if base else "") + "".join(f"{k}{'B' if bt else 's'}" for k, bt in fs)
                      or "-" for base, fs in layout)
    return f"B{B}-N{N}-C{C}-K{K}-D{len(layout)}[{stages}]"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("B,N,C,K,layout", PARITY, ids=[case_id(*c) for c in PARITY])
def test_float64_matches_reference(backend, B, N, C, K, layout):
    if interpreted(backend) and (N > 100 or N * C > 100 * 128):
        pytest.skip(f"N = {N}, C = {C}: too slow for Triton's interpreter (a GPU runs it)")
    case = Case(B, N, C, K, layout, seed=N + C + K)
    expected = case.forward_backward("reference")
    actual = case.forward_backward(backend)
    assert len(actual) == 4 + len(case.tensors())
    for a, e in zip(actual, expected, strict=True):
        assert_matches(a, e, F64_TOL)


@pytest.mark.parametrize("backend", FUSED)
def test_stats_output_layout(backend):
    """stats[b, n, d] = (mean, 1/std) of the k row entering stage d, then of the v row."""
    case = Case(2, 37, 16, 3, [(T, [(3, F)]), (F, [(2, T)])], seed=3)
    stats = case.run(backend)[3].cpu()
    assert stats.shape == (2, 37, 2, 4)
    k, v = case.k_in, case.v_in
    for d in range(2):
        for col, x in ((0, k), (2, v)):
            var, mean = torch.var_mean(x, dim=-1, correction=0)
            assert_matches(stats[:, :, d, col], mean, F64_TOL)
            assert_matches(stats[:, :, d, col + 1], (var + NORM_EPS).rsqrt(), F64_TOL)
        mod = case.stage_bases[d] if case.stage_bases[d] is not None else 1
        for m, t, s in zip(case.masks, case.tables, case.factor_stages):
            if s == d:
                mod = mod * (m.transpose(1, 2) @ t)
        k = torch.nn.functional.layer_norm(k, (16,), case.norms[0][d], case.norms[1][d],
                                           NORM_EPS) * mod
        v = torch.nn.functional.layer_norm(v, (16,), case.norms[2][d], case.norms[3][d],
                                           NORM_EPS) * mod


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", [[(F, [])], [(T, [(3, T)]), (T, [(4, F), (2, F)])]],
                         ids=["D1-plain", "D2"])
def test_non_contiguous_inputs(backend, layout):
    # (On a GPU the copies to the device are contiguous: there this is one more parity case.)
    B, N, C, K = 2, tokens(backend, 301), 32, 5
    case = Case(B, N, C, K, layout, seed=5)

    def strided(t):
        # The same values through a transposed, stepped view.
        wide = torch.empty(*t.shape[:-2], t.shape[-1], 2 * t.shape[-2], dtype=t.dtype)
        view = wide.transpose(-1, -2)[..., ::2, :]
        view.copy_(t)
        assert not view.is_contiguous() and torch.equal(view, t)
        return view

    noncontig = case.with_tensors([strided(t) if t.dim() >= 2 and t.shape[-2] > 1 else t
                                   for t in case.tensors()])
    noncontig.grads = tuple(strided(g) for g in case.grads)
    expected = case.forward_backward("reference")
    for a, e in zip(noncontig.forward_backward(backend), expected, strict=True):
        assert_matches(a, e, F64_TOL)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", [
    [(F, [])],
    [(F, [(3, F)]), (T, [(7, T), (3, F)])],
    [(T, [(3, F)]), (F, [(7, F)]), (T, [(10, F), (3, T)])],
], ids=["D1-plain", "D2", "D3"])
def test_low_precision_matches_float64_reference(backend, layout):
    """Every dtype below float64 the backend implements (TOLERANCES; the interpreter
    runs bfloat16 only, the 16-bit path: float32 runs in the tests above)."""
    for dtype in low_precision_dtypes(backend):
        case = Case(2, tokens(backend, 4099), 64 if interpreted(backend) else 128, 7, layout,
                    dtype=dtype, seed=11)
        expected = case.to(torch.float64).forward_backward("reference")
        for a, e in zip(case.forward_backward(backend), expected, strict=True):
            assert a.dtype == dtype
            assert_matches(a.double(), e, TOLERANCES[dtype])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("B,N,C,layout", [
    (2, 8209, 128, [(F, [])]),
    (3, 12289, 40, [(F, [])]),
    (2, 8209, 128, [(T, [(3, F)]), (T, [])]),
    (3, 12289, 40, [(T, [])]),
], ids=["C128-D1-plain", "C40-D1-plain", "C128-D2", "C40-D1-base"])
def test_float64_matches_reference_with_large_outputs(backend, B, N, C, layout):
    # Gradients of k_in, v_in and the bases past 16 MB: the CPU kernels write them
    # in non-temporal stores (rows of 128 and of 40 float64 values: whole vectors,
    # each row aligned).
    if interpreted(backend):
        pytest.skip("too large for Triton's interpreter (a GPU runs it)")
    case = Case(B, N, C, 7, layout, seed=N + C)
    expected = case.forward_backward("reference")
    for a, e in zip(case.forward_backward(backend), expected, strict=True):
        assert_matches(a, e, F64_TOL)


# ---------------------------------------------------------------- the stats cache

CACHE_LAYOUT = [(F, [(3, F)]), (T, [(7, F), (3, T)]), (F, [(2, F)])]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", [CACHE_LAYOUT, [(F, [])]], ids=["D3", "D1-plain"])
def test_stats_cache_gives_bitwise_the_same_outputs(backend, dtype, layout):
    case = Case(2, tokens(backend, 263), 64, 5, layout, dtype=dtype, seed=13)
    first = case.run(backend)
    stats = first[3]
    assert_identical(case.run(backend, stats), first)
    for S in range(len(layout)):  # the leading S stages, S < D (S = 0 included)
        assert_identical(case.run(backend, stats[:, :, :S]), first)
        assert_identical(case.run(backend, stats[:, :, :S].contiguous()), first)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", [CACHE_LAYOUT, [(F, [])]], ids=["D3", "D1-plain"])
def test_stats_cache_gives_bitwise_the_same_gradients(backend, dtype, layout):
    # The autograd formula hands the forward's stats output to the backward op
    # (the CPU kernel reads it): from a valid cache, or none, the same gradients.
    case = Case(2, tokens(backend, 263), 64, 5, layout, dtype=dtype, seed=13)
    plain = case.forward_backward(backend)
    for S in range(len(layout) + 1):
        assert_identical(case.forward_backward(backend, plain[3][:, :, :S]), plain)


@pytest.mark.parametrize("backend", FUSED)
def test_stats_of_a_parent_pass_serve_its_child(backend):
    """A level's pass through stages 0..D-2 (its parent's stages) gives the stats
    its child's pass through stages 0..D-1 takes."""
    child = Case(2, tokens(backend, 263), 64, 5, CACHE_LAYOUT, seed=17)
    parent = child.with_tensors(child.tensors())
    parent.norms = [n[:2] for n in child.norms]
    parent.stage_bases = child.stage_bases[:2]
    keep = [j for j, s in enumerate(child.factor_stages) if s < 2]
    parent.masks = [child.masks[j] for j in keep]
    parent.tables = [child.tables[j] for j in keep]
    parent.factor_stages = [child.factor_stages[j] for j in keep]
    parent.queries = child.queries[:, :3]
    parent_stats = parent.run(backend)[3]
    expected = child.run(backend)
    assert_identical(child.run(backend, parent_stats), expected)
    assert torch.equal(parent_stats, expected[3][:, :, :2])
    # and matches the reference, which ignores the cache
    for a, e in zip(child.run(backend, parent_stats), child.run("reference")):
        assert_matches(a.cpu(), e, F64_TOL)


@pytest.mark.parametrize("backend", FUSED)
def test_stats_cache_is_used_by_the_forward(backend):
    case = Case(2, tokens(backend, 263), 32, 4, CACHE_LAYOUT, seed=19)
    plain = case.forward_backward(backend)
    stale = plain[3].clone()
    stale[..., 0] += 0.25  # shifted means: the forward must see them
    stale[..., 3] *= 1.5
    cached = case.forward_backward(backend, stale)
    assert not torch.equal(cached[0], plain[0])  # the forward read the cache ...
    assert torch.equal(cached[3], stale)  # ... and passed it through
    # The reference ignores the cache altogether.
    assert_identical(case.forward_backward("reference", stale),
                     case.forward_backward("reference"))


# ---------------------------------------------------------------- torch.library


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", [
    [(F, [])],
    [(T, [(3, F)]), (F, [(2, T), (3, F)])],
], ids=["D1-plain", "D2-mixed"])
def test_opcheck(backend, layout):
    case = Case(2, tokens(backend, 260), 8, 3, layout, seed=23).on(backend)
    args = case.op_args()
    with_grad = tuple(
        [t.requires_grad_() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
        else a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op_namespace(backend).slot_attention_pass, with_grad)
    stats = case.run(backend)[3]
    torch.library.opcheck(op_namespace(backend).slot_attention_pass,
                          case.op_args(stats[:, :, :1]))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", [
    [(F, [])],
    [(T, [(3, F)]), (F, [(2, T), (3, F)])],
], ids=["D1-plain", "D2-mixed"])
def test_opcheck_backward(backend, layout):
    # The schema declares ten separate outputs: none may alias another (test_schema).
    case = Case(2, tokens(backend, 260), 8, 3, layout, seed=23).on(backend)
    attn, _, _, stats = case.run(backend)
    for cached in (None, stats):  # the forward's stats, as the autograd formula passes
        torch.library.opcheck(op_namespace(backend).slot_attention_pass_backward,
                              (*case.grads, *case.op_args(cached)[:13], attn, NORM_EPS,
                               ATTN_EPS))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", [[(F, [])], [(T, [(2, F)]), (F, [(3, T)])]],
                         ids=["D1-plain", "D2"])
def test_gradcheck_across_the_chunk_boundary(backend, layout):
    # N = 260 crosses the CPU kernel's 256-token reduction chunk; 70 the Triton
    # kernels' tiles (at most 64 tokens).
    case = Case(2, tokens(backend, 260), 6, 3, layout, seed=29).on(backend)
    tensors = tuple(t.detach().requires_grad_() for t in case.tensors())

    def fused(*flat):
        return case.with_tensors(flat).run(backend)[:3]

    assert torch.autograd.gradcheck(fused, tensors, fast_mode=True)


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend):
    case = Case(2, 97, 16, 3, [(T, [(3, F)]), (F, [(2, T)])], seed=31).on(backend)

    def fn(*flat):
        attn, attn_sum, attn_v, _ = case.with_tensors(flat).run(backend)
        return (attn_v / attn_sum.unsqueeze(-1)).tanh().sum() + attn.square().sum()

    compiled = torch.compile(fn, fullgraph=True)
    results = []
    for f in (fn, compiled):
        leaves = [t.detach().requires_grad_() for t in case.tensors()]
        out = f(*leaves)
        results.append([out.detach(), *torch.autograd.grad(out, leaves)])
    for a, e in zip(*reversed(results), strict=True):
        assert_matches(a, e, F64_TOL)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", [[(F, [])], [(F, [(3, F)]), (T, [(7, T), (3, F)])]],
                         ids=["D1-plain", "D2"])
def test_bitwise_repeatable_and_thread_count_independent(backend, layout, restore_threads):
    N, C = (70, 32) if interpreted(backend) else (5003, 128)
    case = Case(2, N, C, 7, layout, dtype=torch.float32, seed=37)
    first = case.forward_backward(backend)
    assert_identical(case.forward_backward(backend), first)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert_identical(case.forward_backward(backend), first)


# ---------------------------------------------------------------- errors


def small_case():
    return Case(2, 10, 8, 3, [(T, [(3, F)]), (F, [(2, T)])], seed=41)


def edited(**changes):
    """The wrapper's arguments of a small valid case, with ``changes`` applied."""
    c = small_case()
    args = dict(k_in=c.k_in, v_in=c.v_in, norm_k_weight=c.norms[0], norm_k_bias=c.norms[1],
                norm_v_weight=c.norms[2], norm_v_bias=c.norms[3], stage_bases=c.stage_bases,
                factor_masks=c.masks, factor_tables=c.tables, factor_stages=c.factor_stages,
                queries=c.queries, stats=None)
    for name, change in changes.items():
        args[name] = change(args[name])
    return args


def set_item(j, fn):
    return lambda lst: [fn(x) if i == j else x for i, x in enumerate(lst)]


WRAPPER_ERRORS = [
    ("k-not-a-tensor", dict(k_in=lambda t: t.tolist()), TypeError,
     "k_in must be a torch.Tensor"),
    ("integer", dict(k_in=lambda t: t.long(), v_in=lambda t: t.long()), TypeError,
     "floating-point"),
    ("mixed-dtypes", dict(queries=lambda t: t.float()), TypeError, "share one dtype"),
    ("mixed-devices", dict(factor_tables=set_item(1, lambda t: t.to("meta"))), ValueError,
     "one device"),
    ("k-2d", dict(k_in=lambda t: t[0], v_in=lambda t: t[0]), ValueError,
     r"k_in must be \[B, N, C\]"),
    ("k-v-mismatch", dict(v_in=lambda t: t[:, :9]), ValueError,
     r"v_in must be \[B, N, C\] like k_in"),
    ("norm-not-DC", dict(norm_v_bias=lambda t: t[:, :7]), ValueError,
     r"norm_v_bias must be \[D, C\]"),
    ("norm-depth-mismatch", dict(norm_k_bias=lambda t: t[:1]), ValueError,
     r"norm_k_bias must be \[D, C\]"),
    ("queries-channels", dict(queries=lambda t: t[..., :7]), ValueError,
     r"queries must be \[B, K, C\] = \[2, K >= 1, 8\]"),
    ("queries-batch", dict(queries=lambda t: t[:1]), ValueError, r"queries must be \[B, K, C\]"),
    ("stage-bases-length", dict(stage_bases=lambda lst: lst + [None]), ValueError,
     r"norm_k_weight must be \[D, C\], a row per stage, with D = 3 stages \(one per "
     r"stage_bases entry\); got shape \[2, 8\]"),
    ("stage-base-shape", dict(stage_bases=set_item(0, lambda t: t[:, :9])), ValueError,
     r"stage_bases\[0\] must be \[B, N, C\] like k_in"),
    ("factor-stages-unsorted", dict(factor_stages=lambda s: s[::-1]), ValueError,
     "factor_stages must be sorted"),
    ("factor-stage-out-of-range", dict(factor_stages=lambda s: [0, 2]), ValueError,
     r"factor_stages must be sorted stage indices in \[0, 2\)"),
    ("factor-stage-negative", dict(factor_stages=lambda s: [-1, 0]), ValueError,
     "factor_stages must be sorted stage indices"),
    ("factor-stages-length", dict(factor_stages=lambda s: [0]), ValueError,
     "factor_stages has 1 entries but there are 2 factors"),
    ("stats-shape", dict(stats=lambda _: torch.zeros(2, 10, 3, 4, dtype=torch.float64)),
     ValueError, r"stats must be \[B, N, S, 4\]"),
    ("stats-last-dim", dict(stats=lambda _: torch.ones(2, 10, 1, 3, dtype=torch.float64)),
     ValueError, r"stats must be \[B, N, S, 4\]"),
    ("mask-table-slots", dict(factor_tables=set_item(0, lambda t: t[:, :2])), ValueError,
     r"tables\[0\] must be \[B or 1, K, C\] = \[2 or 1, 3, 8\]"),
    ("mask-tokens", dict(factor_masks=set_item(1, lambda t: t[..., :9])), ValueError,
     r"masks\[1\] must be \[B, K, N\] = \[2, K >= 1, 10\]"),
    ("mask-table-count", dict(factor_tables=lambda lst: lst[:1]), ValueError,
     "got 2 masks but 1 tables"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("changes,error,match", [c[1:] for c in WRAPPER_ERRORS],
                         ids=[c[0] for c in WRAPPER_ERRORS])
def test_wrapper_rejects_bad_arguments(backend, changes, error, match):
    with pytest.raises(error, match=match):
        slot_attention_pass(**edited(**changes), backend=backend)


@requires_kernels
def test_cpu_backend_rejects_half_and_non_cpu_tensors():
    c = small_case()
    half = c.to(torch.float16)
    with pytest.raises(TypeError, match="implement float32, float64; got k_in of dtype "
                                        "torch.float16"):
        half.run("cpu")
    meta = c.with_tensors([t.to("meta") for t in c.tensors()])
    with pytest.raises(ValueError, match="computes on CPU tensors, got tensors on meta"):
        meta.run("cpu")
    with pytest.raises(ValueError, match="unknown backend 'fast'; expected one of reference, cpu, cuda, triton"):
        c.run("fast")


def op_errors():
    op = torch.ops.exposure_slot.slot_attention_pass
    backward = torch.ops.exposure_slot.slot_attention_pass_backward
    c = small_case()

    def call(**changes):
        a = dict(zip(("k_in", "v_in", "nkw", "nkb", "nvw", "nvb", "bases", "base_stages",
                      "masks", "tables", "factor_stages", "queries", "stats", "norm_eps",
                      "attn_eps"), c.op_args()))
        for name, change in changes.items():
            a[name] = change(a[name])
        return lambda: op(*a.values())

    attn = op(*c.op_args())[0]

    def call_backward(grads, stats=None, attn=attn):
        return lambda: backward(*grads, *c.op_args(stats)[:13], attn, NORM_EPS, ATTN_EPS)

    ga, gs, gv = c.grads
    return [
        ("dtype", call(k_in=lambda t: t.float(), v_in=lambda t: t.float()), "share one dtype"),
        ("half", call(**{n: (lambda t: t.half()) for n in ("k_in", "v_in", "nkw", "nkb", "nvw",
                                                           "nvb", "queries")}), "Half"),
        ("k-v-mismatch", call(v_in=lambda t: t[:, :9]), r"v_in must be \[B, N, C\] like k_in"),
        ("k-2d", call(k_in=lambda t: t[0]), r"k_in must be \[B, N, C\]"),
        ("norm-shape", call(nvw=lambda t: t[:, :7]), r"norm_v_weight must be \[D, C\]"),
        ("norm-1d", call(nkw=lambda t: t[0]), r"norm_k_weight must be \[D, C\] with D >= 1"),
        ("queries-channels", call(queries=lambda t: t[..., :7]), r"queries must be \[B, K, C\]"),
        ("base-shape", call(bases=lambda lst: [lst[0][:, :9]]), r"stage_bases\[0\] must be"),
        ("base-stages-length", call(base_stages=lambda s: [0, 1]),
         "base_stages has 2 entries but there are 1 stage_bases"),
        ("base-stage-range", call(base_stages=lambda s: [2]),
         r"base_stages must be increasing stage indices in \[0, 2\)"),
        ("factor-stages-unsorted", call(factor_stages=lambda s: [1, 0]), "must be sorted"),
        ("factor-stage-range", call(factor_stages=lambda s: [0, 2]),
         r"factor_stages\[1\] = 2 is not a stage in \[0, 2\)"),
        ("factor-stages-length", call(factor_stages=lambda s: [0]),
         "factor_stages has 1 entries but there are 2 factors"),
        ("mask-table-slots", call(tables=lambda lst: [lst[0][:, :2], lst[1]]),
         r"tables\[0\] must be \[B or 1, K, C\]"),
        ("mask-table-count", call(tables=lambda lst: lst[:1]), "got 2 masks but 1 tables"),
        ("stats-shape", call(stats=lambda _: torch.ones(2, 10, 3, 4, dtype=torch.float64)),
         r"stats must be \[B, N, S, 4\] with S <= D = 2"),
        ("stats-dtype", call(stats=lambda _: torch.ones(2, 10, 1, 4)), "share one dtype"),
        ("grad-attn-shape", call_backward((ga[:, :, :9], gs, gv)), r"grad_attn must be \[B, K, N\]"),
        ("grad-sum-shape", call_backward((ga, gs[:, :2], gv)), r"grad_attn_sum must be \[B, K\]"),
        ("grad-v-shape", call_backward((ga, gs, gv[..., :7])), r"grad_attn_v must be \[B, K, C\]"),
        ("grad-dtype", call_backward((ga, gs.float(), gv)), "share one dtype"),
        ("backward-stats-shape", call_backward(c.grads, torch.ones(2, 9, 2, 4, dtype=torch.float64)),
         r"stats must be \[B, N, S, 4\] with S <= D = 2"),
        ("backward-attn-shape", call_backward(c.grads, attn=attn[:, :2]),
         r"attn must be \[B, K, N\] \(the forward's attn\)"),
        ("backward-attn-dtype", call_backward(c.grads, attn=attn.float()), "share one dtype"),
    ]


@requires_kernels
def test_compiled_ops_reject_bad_arguments():
    """Called directly, the C++ kernels check their arguments (RuntimeError;
    NotImplementedError, a subclass, for dtypes the dispatch does not cover)."""
    for name, call, match in op_errors():
        with pytest.raises(RuntimeError, match=match):
            call()
            pytest.fail(f"case {name} raised nothing")


@pytest.mark.parametrize("backend", [p for p in FUSED if p.values[0] != "cuda"])
def test_fake_kernels_on_meta_tensors(backend):
    op = op_namespace(backend).slot_attention_pass
    backward = op_namespace(backend).slot_attention_pass_backward
    c = small_case()
    meta = c.with_tensors([t.to("meta") for t in c.tensors()])
    attn, attn_sum, attn_v, stats = op(*meta.op_args())
    assert attn.device.type == "meta"
    assert (attn.shape, attn_sum.shape, attn_v.shape, stats.shape) == (
        (2, 3, 10), (2, 3), (2, 3, 8), (2, 10, 2, 4))
    grads = backward(*(g.to("meta") for g in c.grads), *meta.op_args()[:13], attn, NORM_EPS,
                     ATTN_EPS)
    flat = [g for x in grads for g in (x if isinstance(x, list) else [x])]
    assert [g.shape for g in flat] == [t.shape for t in meta.tensors()]
    args = list(meta.op_args())
    args[10] = [1, 0]
    with pytest.raises(ValueError, match="factor_stages must be sorted"):
        op(*args)
    args = list(meta.op_args())
    args[0] = args[0][:, :9]
    with pytest.raises(ValueError, match=r"v_in must be \[B, N, C\] like k_in"):
        op(*args)


@pytest.mark.parametrize("backend", [p for p in FUSED if p.values[0] == "triton"])
def test_triton_ops_reject_shapes_beyond_the_kernels(backend):
    """The Triton ops name the limit they do not implement."""
    op = op_namespace(backend).slot_attention_pass
    c = small_case().on(backend)
    args = list(c.op_args())
    with pytest.raises(TypeError, match="share one dtype"):
        op(*[a.float() if i == 0 else a for i, a in enumerate(args)])
    wide = Case(1, 4, 300, 3, [(F, [])], seed=1).on(backend)
    with pytest.raises(ValueError, match="implement C <= 256, got C = 300"):
        op(*wide.op_args())
    many = Case(1, 4, 8, 17, [(F, [])], seed=1).on(backend)
    with pytest.raises(ValueError, match=r"implement K <= 16 slots"):
        op(*many.op_args())
    deep = Case(1, 4, 8, 3, [(F, [])] * 5, seed=1).on(backend)
    with pytest.raises(ValueError, match=r"implement D <= 4 stages"):
        op(*deep.op_args())
