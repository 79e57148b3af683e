"""psrv: a communication-efficient parameter server over gRPC.

Layers, imports pointing one way:
  core (``psrv.bitpack``, ``psrv.payload``, ``psrv.compress``, ``psrv.triggers``,
  ``psrv.algorithms``, ``psrv.aggregate``, ``psrv.tasks``, ``psrv.data``)
  <- codec (``psrv.codec``: core objects <-> protobuf)
  <- edges (``psrv.server``, the ``worker`` package, ``psrv.cli``).
"""

__version__ = "0.1.0"

__all__ = ["RunResult", "TorchSpec", "run"]


def __getattr__(name: str):  # noqa: ANN202 -- lazily: ``import psrv`` stays free of torch and grpc
    """``psrv.run`` and ``psrv.RunResult`` (:mod:`psrv.api`), ``psrv.TorchSpec`` (:mod:`psrv.tasks.torch_task`)."""
    if name in ("run", "RunResult"):
        from psrv import api

        return getattr(api, name)
    if name == "TorchSpec":
        from psrv.tasks.torch_task import TorchSpec

        return TorchSpec
    raise AttributeError(f"module 'psrv' has no attribute {name!r}")
