"""psrv: a communication-efficient parameter server over gRPC.

Layers, imports pointing one way:
  core (``psrv.bitpack``, ``psrv.payload``, ``psrv.compress``, ``psrv.triggers``,
  ``psrv.algorithms``, ``psrv.aggregate``, ``psrv.tasks``, ``psrv.data``)
  <- codec (``psrv.codec``: core objects <-> protobuf)
  <- edges (``psrv.server``, the ``worker`` package, ``psrv.cli``).
"""

__version__ = "0.1.0"
