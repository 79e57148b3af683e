"""CPU per round of one host process of 10 logical LAQ workers (worker.host.run_host) against a server
in a forked process, on MNIST: ``python scripts/idle_host_cpu.py CODE_DIR ROUNDS`` (CODE_DIR: a
checkout, ``.`` or an older one made with ``git archive``); loading the data is not counted.
docs/idle-round.md."""

import multiprocessing as mp
import os
import sys
import time

CODE, ROUNDS, M = sys.argv[1], int(sys.argv[2]), 10
os.chdir(CODE)
sys.path.insert(0, CODE)


def serve(q: mp.Queue) -> None:
    from psrv.engine import ServerConfig
    from psrv.server import ParameterServer, create_server

    ids = tuple(f"w{i}" for i in range(M))
    cfg = ServerConfig(
        num_workers=M, rounds=ROUNDS, round_timeout=60.0, start_timeout=30.0, register_timeout=60.0,
        worker_ids=ids, algorithm="laq",
    )  # fmt: skip
    ps = ParameterServer(cfg)
    server, port = create_server(ps)
    q.put(port)
    cpu = time.process_time()
    ps.run()
    q.put(time.process_time() - cpu)
    server.stop(None)


def main() -> None:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=serve, args=(q,))
    proc.start()
    port = q.get()
    from worker.client import WorkerConfig
    from worker.host import host_configs, load_host_data, run_host

    base = WorkerConfig(server=f"127.0.0.1:{port}", worker_id="", data="mnist", seed=0)
    cfgs = host_configs(base, range(M), M, [f"w{i}" for i in range(M)])
    datasets = load_host_data(cfgs)
    wall, cpu = time.perf_counter(), time.process_time()
    result = run_host(cfgs, datasets)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    server_cpu = q.get()
    proc.join()
    print(
        f"{CODE}: host CPU {1e3 * cpu / ROUNDS:.2f} ms/round, server CPU {1e3 * server_cpu / ROUNDS:.2f} ms/round, "
        f"wall {1e3 * wall / ROUNDS:.2f} ms/round, errors {result.errors}"
    )


if __name__ == "__main__":
    main()
