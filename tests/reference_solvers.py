"""The reference implementation's solver loops (zju-pi/diff-sampler, gits-main/solvers.py and
solver_utils.py), restated as plain float64 loops over tensors.  geosample's solvers must agree
with these to rounding; they are written independently of geosample's coefficient functions.

Each function takes D(x, sigma_float), x_T and a list of positive sigmas, returns x at sigmas[-1].
"""
import math

import numpy as np
import torch


def _d(D, x, t, afs):
    return x / math.sqrt(1 + t * t) if afs else (x - D(x, t)) / t


def euler(D, x, ts, afs=False):
    for i in range(len(ts) - 1):
        x = x + (ts[i + 1] - ts[i]) * _d(D, x, ts[i], afs and i == 0)
    return x


def heun(D, x, ts, afs=False):
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        d = _d(D, x, t, afs and i == 0)
        xn = x + (tn - t) * d
        x = x + (tn - t) * (0.5 * d + 0.5 * (xn - D(xn, tn)) / tn)
    return x


def dpm2(D, x, ts, afs=False, r=0.5):
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        d = _d(D, x, t, afs and i == 0)
        tm = tn ** r * t ** (1 - r)
        xm = x + (tm - t) * d
        x = x + (tn - t) * ((1 / (2 * r)) * (xm - D(xm, tm)) / tm + (1 - 1 / (2 * r)) * d)
    return x


def ipndm(D, x, ts, afs=False, max_order=4):
    buf = []
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        d = _d(D, x, t, afs and i == 0)
        order = min(max_order, i + 1)
        if order == 1:
            x = x + (tn - t) * d
        elif order == 2:
            x = x + (tn - t) * (3 * d - buf[-1]) / 2
        elif order == 3:
            x = x + (tn - t) * (23 * d - 16 * buf[-1] + 5 * buf[-2]) / 12
        else:
            x = x + (tn - t) * (55 * d - 59 * buf[-1] + 37 * buf[-2] - 9 * buf[-3]) / 24
        buf = (buf + [d])[-(max_order - 1):] if max_order > 1 else []
    return x


def ipndm_v(D, x, ts, afs=False, max_order=4):
    buf = []
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        d = _d(D, x, t, afs and i == 0)
        order = min(max_order, i + 1)
        if order == 1:
            x = x + (tn - t) * d
        else:
            hn, h1 = tn - t, t - ts[i - 1]
            if order == 2:
                c = [(2 + hn / h1) / 2, -(hn / h1) / 2]
            elif order == 3:
                h2 = ts[i - 1] - ts[i - 2]
                tmp = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
                c = [(2 + hn / h1) / 2 + tmp, -(hn / h1) / 2 - (1 + h1 / h2) * tmp, tmp * h1 / h2]
            else:
                h2, h3 = ts[i - 1] - ts[i - 2], ts[i - 2] - ts[i - 3]
                t1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
                t2 = ((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2))) \
                    * (hn * (hn + h1) * (hn + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
                q = h1 * (h1 + h2) / (h2 * (h2 + h3))
                c = [(2 + hn / h1) / 2 + t1 + t2,
                     -(hn / h1) / 2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
                     t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
                     -t2 * q * h1 / h2]
            x = x + (tn - t) * (c[0] * d + sum(ck * bk for ck, bk in zip(c[1:], reversed(buf))))
        buf = (buf + [d])[-(max_order - 1):] if max_order > 1 else []
    return x


def deis_coefficients_riemann(ts, max_order=4, n=20000):
    """The reference's tAB coefficients, but with a fine midpoint rule instead of its left sum."""
    l0, l1 = math.log1p(0.002 ** 2), math.log1p(80.0 ** 2)
    beta_d = 2 * (l0 / 1e-3 - l1) / (1e-3 - 1)
    beta_min = l1 - 0.5 * beta_d
    t = [(math.sqrt(beta_min ** 2 + 2 * beta_d * math.log1p(s * s)) - beta_min) / beta_d for s in ts]
    out = []
    for i in range(len(t) - 1):
        order = min(i + 1, max_order)
        edges = np.linspace(t[i], t[i + 1], n + 1)
        tau = 0.5 * (edges[1:] + edges[:-1])
        dtau = (t[i + 1] - t[i]) / n
        alpha = np.exp(-0.5 * tau ** 2 * beta_d - tau * beta_min)
        dsig = 0.5 * (beta_d * tau + beta_min) / np.sqrt(alpha * (1 - alpha))
        prev = [t[i - k] for k in range(order)]
        row = []
        for j in range(order):
            poly = np.ones_like(tau)
            for k in range(order):
                if k != j:
                    poly *= (tau - prev[k]) / (prev[j] - prev[k])
            row.append(float(np.sum(dsig * poly) * dtau))
        out.append(row)
    return out


def deis(D, x, ts, afs=False, max_order=4):
    coeffs = deis_coefficients_riemann(ts, max_order)
    buf = []
    for i in range(len(ts) - 1):
        d = _d(D, x, ts[i], afs and i == 0)
        x = x + sum(c * v for c, v in zip(coeffs[i], [d] + buf[::-1]))
        buf = (buf + [d])[-(max_order - 1):] if max_order > 1 else []
    return x


def dpmpp(D, x, ts, afs=False, max_order=3, lower_order_final=True):
    ms, tb = [], []
    n = len(ts)  # the reference's num_steps (grid points)
    for i in range(n - 1):
        t, tn = ts[i], ts[i + 1]
        m = x - t * _d(D, x, t, True) if (afs and i == 0) else D(x, t)
        ms, tb = (ms + [m])[-3:], (tb + [t])[-3:]
        if lower_order_final:
            order = i + 1 if i + 1 < max_order else min(max_order, n - (i + 1))
        else:
            order = min(max_order, i + 1)
        lam = [-math.log(v) for v in tb]
        lt = -math.log(tn)
        h = lt - lam[-1]
        phi1 = math.expm1(-h)
        if order == 1:
            x = (tn / t) * x - phi1 * ms[-1]
        elif order == 2:
            r0 = (lam[-1] - lam[-2]) / h
            d1 = (ms[-1] - ms[-2]) / r0
            x = (tn / t) * x - phi1 * ms[-1] - 0.5 * phi1 * d1
        else:
            r0, r1 = (lam[-1] - lam[-2]) / h, (lam[-2] - lam[-3]) / h
            d1_0, d1_1 = (ms[-1] - ms[-2]) / r0, (ms[-2] - ms[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = phi1 / h + 1
            phi3 = phi2 / h - 0.5
            x = (tn / t) * x - phi1 * ms[-1] + phi2 * d1 - phi3 * d2
    return x


def _unipc_update(D, x, ms, tb, tn, order, variant, use_corrector):
    lam0 = -math.log(tb[-1])
    h = -math.log(tn) - lam0
    rks, d1s = [], []
    for k in range(1, order):
        rk = (-math.log(tb[-(k + 1)]) - lam0) / h
        rks.append(rk)
        d1s.append((ms[-(k + 1)] - ms[-1]) / rk)
    rks.append(1.0)
    rks = torch.tensor(rks, dtype=torch.float64)
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    fact = 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    R, b = [], []
    for p in range(1, order + 1):
        R.append(rks ** (p - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= p + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = torch.stack(R), torch.tensor(b, dtype=torch.float64)
    x_ = tn / tb[-1] * x - h_phi_1 * ms[-1]
    if d1s:
        rhos_p = torch.tensor([0.5], dtype=torch.float64) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        x_t = x_ - b_h * sum(r * v for r, v in zip(rhos_p.tolist(), d1s))
    else:
        x_t = x_
    m_t = None
    if use_corrector:
        rhos_c = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(R, b)
        m_t = D(x_t, tn)
        corr = sum((r * v for r, v in zip(rhos_c[:-1].tolist(), d1s)), torch.zeros_like(x))
        x_t = x_ - b_h * (corr + rhos_c[-1].item() * (m_t - ms[-1]))
    return x_t, m_t


def unipc(D, x, ts, afs=False, max_order=3, variant="bh2", lower_order_final=True):
    n = len(ts)
    ms = [x - ts[0] * x / math.sqrt(1 + ts[0] ** 2) if afs else D(x, ts[0])]
    tb = [ts[0]]
    for i in range(n - 1):
        if i + 1 < max_order:
            order = i + 1
        else:
            order = min(max_order, n - i - 1) if lower_order_final else max_order
        last = i == n - 2  # geosample never runs the corrector on the last step
        x, m_t = _unipc_update(D, x, ms, tb, ts[i + 1], order, variant, not last)
        if not last:
            ms, tb = (ms + [m_t])[-max_order:], (tb + [ts[i + 1]])[-max_order:]
    return x


REFERENCE = {"euler": euler, "heun": heun, "dpm2": dpm2, "ipndm": ipndm, "ipndm_v": ipndm_v,
             "deis": deis, "dpmpp": dpmpp, "unipc": unipc}


# ---- AMED (amed-solver-main/solvers_amed.py and solver_utils.py), fixed predictions ----------------
# r, c (scale_dir), a (scale_time): one value per interval.  Each loop follows the reference's
# sampler with AMED_predictor given: the extra call D(x_mid, a t_mid), its direction divided by t_mid.

def _t_mid(t, tn, r):
    return (tn ** r) * (t ** (1 - r))


def _one_direction(update):
    """The reference's one-step AMED loops: an Euler step to t_mid, the extra call there, then
    ``update(x, x_m, d, d_m, t, t_mid, t_next, r, c)``."""
    def run(D, x, ts, r, c, a, afs=False):
        for i in range(len(ts) - 1):
            t, tn = ts[i], ts[i + 1]
            d = _d(D, x, t, afs and i == 0)
            tm = _t_mid(t, tn, r[i])
            xm = x + (tm - t) * d
            dm = (xm - D(xm, a[i] * tm)) / tm
            x = update(x, xm, d, dm, t, tm, tn, r[i], c[i])
        return x
    return run


amed_amed = _one_direction(lambda x, xm, d, dm, t, tm, tn, r, c: x + c * (tn - t) * dm)
amed_euler = _one_direction(lambda x, xm, d, dm, t, tm, tn, r, c: xm + c * (tn - tm) * dm)
amed_dpm2 = _one_direction(lambda x, xm, d, dm, t, tm, tn, r, c:
                           x + c * (tn - t) * ((1 / (2 * r)) * dm + (1 - 1 / (2 * r)) * d))


def _ab(h, d, buf):
    order = len(buf) + 1
    if order == 1:
        return h * d
    if order == 2:
        return h * (3 * d - buf[-1]) / 2
    if order == 3:
        return h * (23 * d - 16 * buf[-1] + 5 * buf[-2]) / 12
    return h * (55 * d - 59 * buf[-1] + 37 * buf[-2] - 9 * buf[-3]) / 24


def amed_ipndm(D, x, ts, r, c, a, afs=False, max_order=4):
    buf = []  # the reference's buffer_model: at most max_order - 1 past directions

    def push(d):
        return (buf + [d])[-(max_order - 1):] if max_order > 1 else []

    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        d = _d(D, x, t, afs and not buf)
        tm = _t_mid(t, tn, r[i])
        x = x + _ab(tm - t, d, buf)
        buf = push(d)
        d = (x - D(x, a[i] * tm)) / tm
        x = x + c[i] * _ab(tn - tm, d, buf)
        buf = push(d)
    return x


def _dpmpp_update(x, ms, tb, tn, order, scale=1.0):
    """solver_utils.dpm_pp_update in data prediction, with the AMED scale on the model part."""
    lam = [-math.log(v) for v in tb]
    h = -math.log(tn) - lam[-1]
    phi1 = math.expm1(-h)
    if order == 1:
        return (tn / tb[-1]) * x - scale * phi1 * ms[-1]
    r0 = (lam[-1] - lam[-2]) / h
    d1_0 = (1 / r0) * (ms[-1] - ms[-2])
    if order == 2:
        return (tn / tb[-1]) * x - scale * (phi1 * ms[-1] + 0.5 * phi1 * d1_0)
    r1 = (lam[-2] - lam[-3]) / h
    d1_1 = (1 / r1) * (ms[-2] - ms[-3])
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1 / (r0 + r1)) * (d1_0 - d1_1)
    phi2 = phi1 / h + 1
    phi3 = phi2 / h - 0.5
    return (tn / tb[-1]) * x - scale * (phi1 * ms[-1] - phi2 * d1 + phi3 * d2)


def amed_dpmpp(D, x, ts, r, c, a, afs=False, max_order=3, lower_order_final=True):
    ms, tb = [], []
    n = 2 * len(ts) - 1  # the reference's num_steps on the refined grid

    def order_of(step):
        if lower_order_final:
            return step if step < max_order else min(max_order, n - step)
        return min(max_order, step)

    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        step = 2 * i + 1
        m = x - t * _d(D, x, t, True) if (afs and not ms) else D(x, t)
        ms, tb = ms + [m], tb + [t]
        tm = _t_mid(t, tn, r[i])
        x = _dpmpp_update(x, ms, tb, tm, order_of(step))
        ms, tb = ms + [D(x, a[i] * tm)], tb + [tm]
        x = _dpmpp_update(x, ms, tb, tn, order_of(step + 1), scale=c[i])
        ms, tb = ms[-3:], tb[-3:]
    return x


AMED_REFERENCE = {"amed": amed_amed, "euler": amed_euler, "dpm2": amed_dpm2, "ipndm": amed_ipndm,
                  "dpmpp": amed_dpmpp}


def nfe_schedule(steps: int, to_zero: bool):
    """The NFE-accounting tests' schedule: EDM's, with a trailing 0 (a final full denoise) if asked."""
    import geosample as gs   # the only use of geosample here: the references above stay independent of it
    sig = gs.schedules.polynomial(steps, 0.002, 80.0)
    return torch.cat([sig, sig.new_zeros(1)]) if to_zero else sig
