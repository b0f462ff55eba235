"""Where the GPL stages' batch work runs: in this process (``engine: local``) or on a Ray cluster
(``engine: ray``). Both run the same functions on the same batches, so they write the same labels.

- :class:`BatchJob` work (similarity scoring, pseudo-labels): the driver plans batches of whole users
  in DuckDB; the local engine reads each batch as Arrow and computes it here; the Ray engine stages
  the batch as parquet files, an actor computes it and writes its output as parquet, and the driver
  inserts it into the open DuckDB transaction (DuckDB has one writer: workers never touch it).
- :meth:`Engine.map` work (anchor generation, text encoding): chunks of Python payloads through a
  model each worker loads once (:class:`Shared`).

The engine knows no method: the anchor generator and encoder that hand their work to an engine live
with the labelling stages (:mod:`gpl_platform.pseudo_labels.engine_proxies`). docs/SCALING.md has the
measurements and the path to a real cluster.
"""

from gpl_platform.engine.base import BatchJob, Engine, LocalEngine, Shared
from gpl_platform.engine.factory import close_engines, make_engine

__all__ = ["BatchJob", "Engine", "LocalEngine", "Shared", "close_engines", "make_engine"]
