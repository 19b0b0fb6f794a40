"""The lattice key-value store: pure merges, storage engines, the store, its servicer and client.

* :mod:`cloudburst_kvs.lattices`: merge, stamp and size of ``cloudburst.v1.Lattice``
  (pure functions).
* :mod:`cloudburst_kvs.storage`: the synchronous storage engines (memory and SQLite).
* :mod:`cloudburst_kvs.store`: :class:`~cloudburst_kvs.store.LatticeStore`, the asyncio
  core that other components of the same process may use directly.
* :mod:`cloudburst_kvs.servicer`: the ``KvsService`` gRPC servicer (convert and delegate).
* :mod:`cloudburst_kvs.client`: :class:`~cloudburst_kvs.client.KvsClient`, typed async calls
  to a remote KVS.
* :mod:`cloudburst_kvs.access`: how the scheduler and executors reach the KVS, in this
  process or over gRPC.
* :mod:`cloudburst_kvs.local`: wiring used by the composition roots.
"""
