"""Server timeouts for runs with worker processes that a loaded machine cannot hit.

Worker processes import torch and load their data before they register, and then compute on
cores that other jobs share: on 2 busy cores the 120 s registration default was seen to expire
before 10 workers had registered. A deadline that passes changes what a test measures (a miss is
not an upload), and waiting longer costs nothing when all is well: every wait ends as soon as
the workers are there. Tests of deadlines and misses set their own, short ones.

``done_grace`` 60 s: ``psrv run`` waits 2 x done_grace (at least 30 s) for its workers to exit after
the last round, then kills them (exit code -9); at a load of ~100 on 2 cores a worker was seen
to need more than 30 s to exit."""

from __future__ import annotations

PATIENT = {"register_timeout": 900.0, "start_timeout": 600.0, "round_timeout": 120.0, "done_grace": 60.0}
