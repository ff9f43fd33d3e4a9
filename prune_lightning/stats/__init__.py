"""Second-moment statistics ``C = E[k k^T]`` of the keys of linear layers: computed once, cached with provenance.

- :mod:`.moments`: :func:`second_moment` / :func:`second_moments`, the public face (cache first, the job if missing).
- :mod:`.corpus`: the documents and their stream of padded batches.
- :mod:`.cache`: file names, provenance metadata, loading and saving; :class:`StatsSettings`.
- :mod:`.provenance`: what a ``C`` is a function of, and when a cached one answers a request.
- :mod:`.precision`: the forward pass in lower precision (bfloat16, TF32) while the sums stay float32/float64.
- :mod:`.job`: :class:`SecondMomentJob`, the Lightning module that sums ``K^T K``.
- :mod:`.run`: running the job inside another program (a Trainer of its own).
- :mod:`.reference`: the authors' ``.npz`` layout (ROME/MEMIT's ``layer_stats``, EasyEdit's).
- :mod:`.exchange`: :func:`import_reference_stats` / :func:`export_reference_stats` between that layout and the cache.
- :mod:`.cli`: ``prune-edit stats`` (compute), ``prune-edit stats import``, ``prune-edit stats export``.
"""

from prune_lightning.stats.cache import StatsSettings, load_stats_file, stats_cache_path
from prune_lightning.stats.corpus import REFERENCE_CORPUS, CorpusStream, iter_corpus_documents, load_corpus_texts
from prune_lightning.stats.exchange import export_reference_stats, import_reference_stats
from prune_lightning.stats.job import SecondMomentJob
from prune_lightning.stats.moments import second_moment, second_moments
from prune_lightning.stats.provenance import StatsProvenanceError, tokenizer_sha256
from prune_lightning.stats.run import compute_second_moments

__all__ = [
    "REFERENCE_CORPUS",
    "CorpusStream",
    "SecondMomentJob",
    "StatsProvenanceError",
    "StatsSettings",
    "compute_second_moments",
    "export_reference_stats",
    "import_reference_stats",
    "iter_corpus_documents",
    "load_corpus_texts",
    "load_stats_file",
    "second_moment",
    "second_moments",
    "stats_cache_path",
    "tokenizer_sha256",
]
