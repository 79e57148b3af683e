"""Shaped multi-host runs on one machine, and the same shaping in containers.

- :mod:`psrv.cluster.netns` -- one network namespace per host on a bridge; guaranteed cleanup.
- :mod:`psrv.cluster.shaping` -- tc shaping of an interface's egress and ingress (tbf or htb; ifb).
- :mod:`psrv.cluster.counters` -- wire bytes/packets: qdisc and interface counters, frame capture.
- :mod:`psrv.cluster.run` -- ``psrv cluster run``: server + workers in namespaces, summary.
- :mod:`psrv.cluster.cli` -- the click group ``cluster`` (``run``, ``clean``).
- :mod:`psrv.cluster.entrypoint` -- the container entrypoint (docker-compose.yml): shape, then run psrv.
- :mod:`psrv.cluster.measure` -- ``python -m psrv.cluster.measure``: the figures on shaped links.
"""
