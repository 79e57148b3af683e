"""Shaped multi-host runs on one machine, and the same shaping in containers.

- :mod:`psrv.cluster.netns` -- one network namespace per host on a bridge; guaranteed cleanup.
- :mod:`psrv.cluster.shaping` -- tc shaping of an interface's egress and ingress (tbf or htb; ifb).
- :mod:`psrv.cluster.counters` -- wire bytes/packets: qdisc and interface counters.
- :mod:`psrv.cluster.capture` -- every frame on the bridge (the AF_PACKET loop of :mod:`psrv.inspect.live`).
- :mod:`psrv.cluster.config` -- :class:`~psrv.cluster.config.ClusterConfig`: hosts, links, job, limits.
- :mod:`psrv.cluster.run` -- ``psrv cluster run``: bring-up, server + workers in namespaces, tear-down.
- :mod:`psrv.cluster.analysis` -- the figures from what a run recorded (bytes, round timing, uploads).
- :mod:`psrv.cluster.outputs` -- the run folder: files read back, summary.json and wire-uploads.jsonl written.
- :mod:`psrv.cluster.cli` -- the click group ``cluster`` (``run``, ``clean``).
- :mod:`psrv.cluster.entrypoint` -- the container entrypoint (docker-compose.yml): shape, then run psrv.

``scripts/cluster_measure.py`` measures algorithms on shaped links with these pieces.
"""
