"""The GITS cost matrix by its textbook definition, and the rounding bounds the fast backends keep."""
import math

import torch


def loop_cost(traj, metric):
    """Textbook definition, one pair at a time, float64."""
    x, den, g = traj.x.double().flatten(2), traj.denoised.double().flatten(2), traj.sigmas
    t = x.shape[0]
    u = (x[-1] - x[0]) / (x[-1] - x[0]).norm(dim=-1, keepdim=True)

    def dev(y):
        a = x[-1] - y
        return (a - (a * u).sum(-1, keepdim=True) * u).norm(dim=-1).mean()

    c = torch.full((t, t), math.inf, dtype=torch.float64)
    for i in range(t - 1):
        d = (x[i] - den[i]) / g[i]
        for j in range(i + 1, t):
            e = x[i] + (g[j] - g[i]) * d
            c[i, j] = {"l1": lambda: (e - x[j]).abs().sum(-1).mean(),
                       "l2": lambda: (e - x[j]).norm(dim=-1).mean(),
                       "dev": lambda: dev(e) - dev(x[j])}[metric]()
    return c


def expansion_floor(traj):
    """[T, T]: |X[i] - X[-1]| averaged over samples, by row."""
    t = traj.x.shape[0]
    return (traj.x - traj.x[-1]).flatten(2).norm(dim=-1).mean(1)[:, None].expand(t, t)


def jump_error_bound(traj, metric):
    """What forming e = (x_i - x_j) + h d_i in float32 and summing each block of D in float32 (at
    most 256 terms in a row: 1024-element blocks on 4-lane SSE) may cost, against float64 maths on
    the same float32 points: per element 3 eps32 (|x_i - x_j| + |h d_i|), through the l1 / l2
    norm, plus 256 eps32 of the sum."""
    eps = torch.finfo(torch.float32).eps
    x, den, g = traj.x.double().flatten(2), traj.denoised.double().flatten(2), traj.sigmas
    t = x.shape[0]
    bound = torch.full((t, t), math.inf, dtype=torch.float64)
    for i in range(t - 1):
        d = (x[i] - den[i]) / g[i]
        for j in range(i + 1, t):
            a = 3 * eps * ((x[i] - x[j]).abs() + ((g[j] - g[i]) * d).abs())
            bound[i, j] = (a.sum(-1) if metric == "l1" else a.norm(dim=-1)).mean()
    return bound + 256 * eps * loop_cost(traj, metric).abs()
