"""Scale-out on torch.distributed (NCCL on GPUs, gloo on CPU): a dataset sharded across ranks,
data-parallel sampling, GITS search and feature extraction.  Every function here returns the
same tensor on every rank, equal (to float rounding) to what one process computes.

One module per job:

* :mod:`.group`: the process group (``world_size``, ``rank``, ``is_main``, ``init_from_env``);
* :mod:`.collectives`: contiguous row splits (``split``, ``shard``), ``gather_rows`` and the
  padded-slice collectives the other modules share;
* :mod:`.sharded_kde`: :class:`ShardedKDEDenoiser`, the exact KDE denoiser of a sharded dataset,
  and ``closed_form_denoiser``;
* :mod:`.data_parallel`: ``sample`` and ``extract_features`` over slices of a batch;
* :mod:`.gits_hook`: ``gits_search``, the GITS teacher split across ranks.

Without an initialised process group everything runs as one rank (W = 1, no collectives), so
code written against this package runs unchanged in a single process; the ``geosample`` commands
call the plain library functions instead when they are not launched by torchrun.
"""
from .collectives import gather_rows, shard, split
from .data_parallel import extract_features, sample
from .gits_hook import gits_search
from .group import init_from_env, is_main, rank, world_size
from .sharded_kde import ShardedKDEDenoiser, closed_form_denoiser

__all__ = ["ShardedKDEDenoiser", "closed_form_denoiser", "sample", "gits_search", "extract_features", "gather_rows", "shard",
           "split", "rank", "world_size", "is_main", "init_from_env"]
