"""psrv's test suite (a package, so that tests import shared code as ``tests.helpers...``).

Where to look: tests/test_<module>.py covers psrv/<module>.py and tests/test_<package>_<module>.py
covers psrv/<package>/<module>.py (test_compress_topk.py: psrv/compress/topk.py); a test file named
after a package covers the package (test_cluster.py, test_inspect.py). Outside that scheme:
test_acceptance*.py (claims measured through whole runs: the issue's, the papers', same seed same run),
test_compress_e2e.py (every compressor through server and worker threads), test_docker.py
(Dockerfile and docker-compose.yml) and test_proto_fresh.py (generated code matches protos/).

Selecting (markers in pyproject.toml): ``pytest -m "not slow"`` is the fast loop; ``-m process``
runs the tests that start server/worker processes, ``-m root`` those that need root.

README's command runs the files on two processes (pytest-xdist, ``-n 2 --dist loadfile``; ``-n 0``: one
process): each file whole on one of them, alongside any other file. So a test binds port 0 (or a port
it has just probed free), writes under ``tmp_path``, names namespaces by its pid, and never counts
processes, ports or namespaces it did not start."""
