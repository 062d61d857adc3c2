"""The closed-form denoiser's posterior mean in arbitrary precision (mpmath): the reference for
queries so far from the data that float64 distances cancel (|x - y_i|^2 ~ 1e32 differing by ~1e16)."""
import mpmath
import torch


def softmax_mp(y: torch.Tensor, x: torch.Tensor, sigma: float, dps: int = 80) -> torch.Tensor:
    """sum_i w_i y_i, w = softmax_i(-|x - y_i|^2 / (2 sigma^2)), for the float64 values of y [N, D]
    and x [B, D] taken exactly, evaluated with ``dps`` decimal digits; returned as float64 [B, D]."""
    y, x = y.double().flatten(1).tolist(), x.double().flatten(1).tolist()
    out = []
    with mpmath.workdps(dps):
        s2 = 2 * mpmath.mpf(sigma) ** 2
        for xb in x:
            d = [mpmath.fsum((mpmath.mpf(a) - mpmath.mpf(b)) ** 2 for a, b in zip(xb, yi)) for yi in y]
            dmin = min(d)
            w = [mpmath.exp(-(di - dmin) / s2) for di in d]
            z = mpmath.fsum(w)
            out.append([float(mpmath.fsum(wi * yi[j] for wi, yi in zip(w, y)) / z) for j in range(len(xb))])
    return torch.tensor(out, dtype=torch.float64)
