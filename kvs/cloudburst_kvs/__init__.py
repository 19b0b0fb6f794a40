"""The lattice key-value store: pure merges, storage engines, the store, its servicer and client.

* :mod:`kvs.lattices`: merge, stamp and size of ``cloudburst.v1.Lattice`` (pure functions).
* :mod:`kvs.storage`: the synchronous storage engines (memory and SQLite).
* :mod:`kvs.store`: :class:`~kvs.store.LatticeStore`, the asyncio core that other
  components of the same process may use directly.
* :mod:`kvs.servicer`: the ``KvsService`` gRPC servicer (convert and delegate).
* :mod:`kvs.client`: :class:`~kvs.client.KvsClient`, typed async calls to a remote KVS.
* :mod:`kvs.local`: wiring used by the composition roots.
"""
