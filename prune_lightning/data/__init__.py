"""Edit requests and where they come from: CounterFact and zsRE readers, sources, and the ordered datamodule.

- :class:`EditRequest` - one fact to write, with the prompts that judge it; :class:`RecordError` names the file,
  record and field of a malformed record.
- :func:`read_counterfact`, :func:`read_zsre`, :func:`read_requests` - readers of the two standard schemas.
- :func:`resolve_source` - local file, URL (downloaded once) or ``hub:<dataset_id>``.
- :class:`EditDataModule` - the ordered, resumable stream of edit batches that ``Trainer.fit`` walks.
"""

from prune_lightning.data.counterfact import read_counterfact
from prune_lightning.data.datamodule import EditDataModule, read_requests
from prune_lightning.data.requests import EditRequest, EditRequestError, RecordError
from prune_lightning.data.sources import SourceError, resolve_source
from prune_lightning.data.zsre import read_zsre

__all__ = [
    "EditDataModule",
    "EditRequest",
    "EditRequestError",
    "RecordError",
    "SourceError",
    "read_counterfact",
    "read_requests",
    "read_zsre",
    "resolve_source",
]
