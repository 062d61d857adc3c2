"""The Triton kernels against the float64 reference (small sizes), in a subprocess
(:mod:`triton_script`): compiled on a CUDA machine, under TRITON_INTERPRET=1 on CPU.
With ``index``, the certified sets run on the same device in front of the kernels.
The fused small-D kernel is checked at D in {16, 64} (N = 300: splits of several tiles, one or two
query blocks, ranges of 128 rows), the two-phase kernels at D = 48 by setting FUSED_MAX_D = 0, with
the installed Triton's dot depth and with dots in 16-row slices.
"""
import textwrap

import pytest

pytest.importorskip("triton")

from triton_script import run_triton_script  # noqa: E402

SCRIPT = textwrap.dedent("""
    import torch
    from geosample.denoisers.kde import KDEDenoiser
    from geosample.kernels import kde_triton
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)

    def dataset(*shape):
        y = torch.rand(300, *shape, generator=g) * 2 - 1
        y[100:108] = y[7] + 1e-4 * torch.randn(8, *shape, generator=g)     # near-duplicates of row 7
        return y

    def check(y, sigma, b=5, **kw):
        tri = KDEDenoiser(y, backend="triton", **kw)
        ref = KDEDenoiser(y, backend="reference", storage=kw.get("storage"))
        x = y[torch.randint(0, 300, (b,), generator=g)] + sigma * torch.randn(b, *y.shape[1:], generator=g)
        x[0] = y[7] + sigma * torch.randn(*y.shape[1:], generator=g)
        out, st = tri(x.to(dev), sigma, return_stats=True)
        r, rs = ref(x.double(), sigma, return_stats=True)
        err = ((out.cpu().double() - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1)).max().item()
        assert err <= (1e-4 if sigma >= 1 else 2e-5), (kw, sigma, err)
        rows = ref.store.gather64                     # uint8 turns near-duplicates into exact ties
        assert torch.equal(rows(st.argmax.cpu()), rows(rs.argmax)), (kw, sigma)
        assert torch.allclose(st.log_z.cpu(), rs.log_z, rtol=1e-8, atol=1e-6 * max(1.0, sigma ** -2)), (kw, sigma)
        assert torch.allclose(st.ess.cpu(), rs.ess, rtol=1e-4), (kw, sigma)

    for d in (16, 64):                                # fused kernel
        y = dataset(d)
        for kw in ({}, {"storage": "float16"}, {"storage": "uint8"}):
            for sigma in (80.0, 1.0, 0.05, 0.002):
                check(y, sigma, **kw)
    for sigma in (1.0, 0.002):                        # ranges, two query blocks, refine_k not a power of 2
        check(y, sigma, b=20, chunk_size=128, refine_k=12)

    def hostile(y, b=4):
        # data far from the origin, raw 0..255 pixels, far queries, tiny sigma: against a float64 softmax
        for data, shift, sigma in ((y + 1e3, 0.0, 0.05), ((y + 1) * 127.5, 0.0, 0.002), (y, 1e4, 0.002),
                                   (y, 0.0, 1e-6), (y + 1e4, 0.0, 1.0)):
            flat = data.flatten(1).double()
            x = data[:b] + 1e-5 * torch.randn(b, *data.shape[1:], generator=g) + shift
            w = torch.softmax(-torch.cdist(x.flatten(1).double(), flat) ** 2 / (2 * sigma ** 2), 1)
            out = KDEDenoiser(data, backend="triton")(x.to(dev), sigma).cpu().double().flatten(1)
            ref = w @ flat
            err = ((out - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
            assert err <= 1e-5, (tuple(data.shape), shift, sigma, err)

    hostile(dataset(16))

    def far(y):
        # queries 1e16 from the data: one-hot at sigma 1, a mixture at 1e8 (against mpmath)
        from reference_kde import softmax_mp
        x = y[:3].double() + 1e16 * torch.nn.functional.normalize(torch.randn(3, y[0].numel(), generator=g,
                                                                              dtype=torch.float64), dim=1).view(3, *y.shape[1:])
        for sigma, tol in ((1.0, 1e-12), (1e8, 1e-5)):
            out = KDEDenoiser(y, backend="triton")(x.to(dev), sigma).cpu().flatten(1)
            ref = softmax_mp(y, x, sigma)
            err = ((out - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
            assert err <= tol, ("far", sigma, err)

    far(dataset(16)[:60])

    def indexed(y):
        # the index in front of the Triton pass: certified sets (on dev) at small sigma, the kernels at large
        tri = KDEDenoiser(y, backend="triton", index=dict(cache=False, rank=8))
        ref = KDEDenoiser(y, backend="reference")
        for sigma in (80.0, 1.0, 0.05, 0.002):
            x = y[:5] + sigma * torch.randn(5, *y.shape[1:], generator=g)
            out, st = tri(x.to(dev), sigma, return_stats=True)
            r = ref(x.double(), sigma)
            err = ((out.cpu().double() - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1)).max().item()
            assert err <= (1e-4 if sigma >= 1 else 1e-12), (sigma, err)
            assert bool((st.path.cpu() == 4).all()) == (sigma < 0.1), (sigma, st.path)

    indexed(dataset(16))
    kde_triton.FUSED_MAX_D = 0                        # two-phase kernels
    y = dataset(3, 4, 4)
    for kw in ({}, {"chunk_size": 128}, {"storage": "float16"}, {"storage": "uint8"}):
        for sigma in (80.0, 10.0, 1.0, 0.05, 0.002):
            check(y, sigma, **kw)
    hostile(y)
    two_phase = kde_triton.kde_two_phase               # dots in 16-row slices (Triton >= 3.8, exact precision)
    kde_triton.kde_two_phase = lambda kernel, fast, bb: (16, two_phase(kernel, fast, bb)[1])
    for kw in ({}, {"storage": "uint8"}):
        for sigma in (1.0, 0.002):
            check(y, sigma, b=20, **kw)
    print("ok")
""")


def test_triton_kernels_match_reference():
    run_triton_script(SCRIPT, "ok")
