"""What the commands share: where the denoiser comes from (``--data`` / ``--model``) and the GITS
search's flags, with one set of defaults, so ``geosample gits`` and ``geosample sample`` with the same
flags search the same schedule (and the second finds it in the cache)."""
from __future__ import annotations

import argparse

DATA = "digits"   # the bundled default
SMALL = 1024      # values per sample below which --threads 0 means one thread
SCHEDULES = ("gits", "polynomial", "logsnr", "time_uniform")


def gammas(text: str):
    """'1.15' -> 1.15; '0.9,1.0' -> [0.9, 1.0]; 'sweep' -> geosample.gits.GAMMAS.  A list of whole
    numbers ('1,15') is refused: it is almost always a decimal comma."""
    from ..gits import GAMMAS

    if text == "sweep":
        return list(GAMMAS)
    parts = [v.strip() for v in text.split(",")]
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"gamma must be a number, a comma list of numbers or 'sweep', got {text!r}")
    if len(values) > 1 and all(v.isdigit() for v in parts):
        raise argparse.ArgumentTypeError(f"gamma {text!r} reads as the list {values}: write a decimal with a point "
                                         f"({'.'.join(parts[:2])}), or a list of decimals (0.9,1.0)")
    return values[0] if len(values) == 1 else values


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """--data, --limit, --model, --device, --threads."""
    a = parser.add_argument
    a("--data", default=None, help=f"dataset name ({DATA}, cifar10) or path whose closed-form denoiser to use "
      f"(default {DATA}, bundled)")
    a("--limit", type=int, default=None, help="use a seeded random subset of LIMIT images (the same for every run; "
      "image sets are often sorted by class)")
    a("--model", default=None, help="a shipped trained denoiser instead of a closed form (e.g. cifar10-tiny; see "
      "geosample.models.available())")
    a("--device", default="cpu", help="torch device (default cpu)")
    a("--threads", type=int, default=0, help=f"torch CPU threads (default 0: 1 for samples under {SMALL} values, "
      "e.g. digits, where thread start-up costs more than it saves, else torch's default)")


def add_gits_arguments(parser: argparse.ArgumentParser) -> None:
    """The GITS search's flags: --solver, --nfe, --seed, --afs, --num-warmup, --gamma, --refine, --no-cache."""
    a = parser.add_argument
    a("--solver", default="ipndm", help="solver the schedule is for and judged with (default ipndm); see geosample.SOLVERS")
    a("--nfe", type=int, default=6, help="denoiser calls per sample (default 6); heun/dpm2 use 2 per step")
    a("--seed", type=int, default=0, help="seed (default 0): sample's scored noise; the GITS warm-up noise is drawn "
      "from seed + 1, in both commands")
    a("--afs", action="store_true", help="analytical first step (one denoiser call fewer)")
    a("--num-warmup", type=int, default=None, help="GITS teacher samples (default: 64 for the recommended search, "
      "256 for the reference's)")
    a("--gamma", type=gammas, default="sweep",
      help="GITS DP discount: 'sweep' (default: 0.8-1.3, each path judged by --solver's own error), a comma list, "
           "or one value (1.15: the reference's)")
    a("--refine", action=argparse.BooleanOptionalAction, default=True,
      help="the recommended search (default): DP paths and hand-made schedules judged, refined and checked by "
           "--solver's own error; --no-refine --gamma 1.15 is the reference's search")
    a("--no-cache", action="store_true", help="neither read nor write the GITS cache")


def check_counts(args: argparse.Namespace, *names: str) -> None:
    """ValueError unless each named option is >= 1 (and --threads >= 0)."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if getattr(args, "num_warmup", None) is not None and args.num_warmup < 1:
        raise ValueError(f"--num-warmup must be >= 1, got {args.num_warmup}")


def load_source(args: argparse.Namespace, make_denoiser=None, dtype=None):
    """(denoiser, one sample's shape, a label, the data or None): ``--model``'s network, or the
    closed form of ``--data`` (``make_denoiser(data)``, default :class:`KDEDenoiser`).  Then sets the
    torch threads (``--threads``, or one for small samples)."""
    import torch

    if args.model:
        if args.data is not None or args.limit is not None:
            raise ValueError("--model samples a trained network: --data and --limit do not apply")
        from ..models import load
        denoiser = load(args.model, device=args.device, **({} if dtype is None else {"dtype": dtype}))
        shape, label, data = tuple(denoiser.shape), f"model={args.model}", None
    else:
        from ..data import load_dataset
        from ..denoisers.kde import KDEDenoiser
        name = DATA if args.data is None else args.data
        data = torch.as_tensor(load_dataset(name, limit=args.limit)).to(args.device)
        if dtype is not None:
            data = data.to(dtype)
        denoiser = (make_denoiser or KDEDenoiser)(data)
        shape, label = tuple(data.shape[1:]), f"data={name} {tuple(data.shape)}"
    if args.threads or torch.Size(shape).numel() < SMALL:
        torch.set_num_threads(args.threads or 1)
    return denoiser, shape, label, data


def search_options(args: argparse.Namespace) -> dict:
    """The keyword options of ``gs.gits.search`` the shared flags give."""
    options = dict(solver=args.solver, gamma=args.gamma, refine=args.refine, seed=args.seed + 1, afs=args.afs)
    if args.num_warmup is not None:
        options["num_warmup"] = args.num_warmup
    return options


def make_schedule(name: str, solver: str, nfe: int, denoiser=None, shape=None, *, afs: bool = False,
                  device="cpu", use_cache: bool = True, progress: bool = False, distributed: bool = False,
                  **search_options):
    """(sigmas, gits_schedule_or_None) for ``name`` with ``nfe`` calls of ``solver``.

    gits: :func:`geosample.gits.search` for ``denoiser`` on samples of ``shape`` with
    ``search_options`` (its defaults otherwise; ``solver`` judges the paths); with ``afs`` it
    searches one step fewer and inserts the free analytical first step.
    ``distributed``: :func:`geosample.distributed.gits_search` (teacher split across ranks, no cache).
    """
    from .. import gits, schedules
    from ..solvers import steps_for_nfe

    steps = steps_for_nfe(solver, nfe, afs)
    if name == "gits":
        if steps - int(afs) < 1:
            raise ValueError(f"GITS with afs needs at least 2 steps; got nfe={nfe} for {solver}")
        if distributed:
            from ..distributed import gits_search as search
            cache = {}
        else:
            search, cache = gits.search, {"use_cache": use_cache}
        found = search(denoiser, shape, steps - int(afs), afs=afs, solver=solver, device=device, progress=progress,
                       **search_options, **cache)
        return found.sigmas, found
    if name.endswith(".json"):
        return gits.load_sigmas(name), None
    if name in SCHEDULES:
        return schedules.by_name(name, steps), None
    raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)} or a .json file")
