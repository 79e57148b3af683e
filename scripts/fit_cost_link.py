"""Fit a cost model on a shaped link (root) and check it on sizes it was not fitted on.

    python scripts/fit_cost_link.py --rate 10mbit --out /tmp/fit10 [--max-bytes 2000000] [--repeat 3]

Two network namespaces a and b on a bridge (:mod:`psrv.cluster.netns`); a's egress is shaped by a
tbf at ``--rate`` (:mod:`psrv.cluster.shaping`; netem, hence added latency, is not used). A psrv
server runs in b; ``psrv fit-cost`` runs in a twice: once on its default sizes (the fit, written to
OUT/fit.json with its plot OUT/fit.png), once on sizes between those (OUT/holdout.json). Prints
and writes (OUT/check.json) each held-out size's measured median, the fit's prediction and the
relative error: Khirirat et al. (AAAI 2021, Appendix H) fit their model the same way, to check
that it captures the real cost of a message before tuning against it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's psrv

import click  # noqa: E402

from psrv import costfit  # noqa: E402
from psrv.cluster import shaping  # noqa: E402
from psrv.cluster.netns import ClusterError, Topology, interrupt_guard, require_root  # noqa: E402
from psrv.cluster.run import child_env  # noqa: E402

PORT = 50051


def _run(topo: Topology, host: str, argv: list[str], timeout: float) -> str:
    proc = topo.popen(host, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise ClusterError(f"{' '.join(argv[:4])} took more than {timeout:g} s") from None
    if proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv[:4])} failed ({proc.returncode}):\n{out}")
    return out


def fit_and_check(
    rate: int,
    out: Path,
    max_bytes: int = 2_000_000,
    repeat: int = 3,
    timeout: float = 300.0,
    peak: bool = True,
    stat: str = "min",
) -> dict[str, Any]:
    """The fit on a shaped link and its held-out check (see the module docstring); needs root."""
    require_root()
    out.mkdir(parents=True, exist_ok=True)
    link = f"tbf {shaping.format_rate(rate)}{' peakrate +1%' if peak else ''} egress a->b, namespaces on a bridge"
    with interrupt_guard(), Topology(["a", "b"]) as topo:
        a, b = topo.hosts["a"], topo.hosts["b"]
        shaping.shape_egress(a.iface, rate, a.netns)
        if peak:  # the same tbf, its burst sent at most at 1% above the rate: no burst credit
            burst, limit = shaping.tbf_params(rate)
            shaping.tc(a.netns, "qdisc", "replace", "dev", a.iface, "root", "tbf", "rate", f"{rate}bit", "burst",
                       str(burst), "limit", str(limit), "peakrate", f"{rate * 101 // 100}bit", "mtu",
                       str(shaping.MTU_FRAME))  # fmt: skip
        server = topo.popen(
            "b",
            [
                sys.executable,
                "-m",
                "psrv",
                "start-server",
                "--algorithm",
                "gd",
                "--host",
                b.ip,
                "--port",
                str(PORT),
                "--register-timeout",
                str(timeout),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        try:
            assert server.stderr is not None
            line = server.stderr.readline()  # "psrv server listening on ..."
            if "listening" not in line:
                raise ClusterError(f"the server did not start: {line}{server.stderr.read()}")
            common = [sys.executable, "-m", "psrv", "fit-cost", "--server", f"{b.ip}:{PORT}", "--iface", a.iface,
                      "--repeat", str(repeat), "--link", link, "--stat", stat]  # fmt: skip
            t0 = time.monotonic()
            fit_text = _run(topo, "a", [*common, "--max-bytes", str(max_bytes), "--out", str(out / "fit.json"),
                                        "--plot", str(out / "fit.png")], timeout)  # fmt: skip
            sizes = ",".join(str(n) for n in costfit.holdout_sizes(max_bytes))
            _run(topo, "a", [*common, "--sizes", sizes, "--out", str(out / "holdout.json")], timeout)
            seconds = time.monotonic() - t0
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    fit = json.loads((out / "fit.json").read_text())
    held = json.loads((out / "holdout.json").read_text())["measurements"]
    check = {
        "link": link,
        "rate_bps": rate,
        "fit": {k: fit[k] for k in ("model", "c0", "c1", "p_max_bytes") if k in fit},
        "fits": fit["fits"],
        "stat": stat,
        "holdout": {},
        "seconds": seconds,
    }
    for name, f in [("best", fit), *fit["fits"].items()]:
        rows = []
        for m in held:
            p = float(costfit.predict(f, m["wire_bytes"]))
            rows.append({"wire_bytes": m["wire_bytes"], "measured_s": m[f"seconds_{stat}"], "predicted_s": p,
                         "rel_error": (p - m[f"seconds_{stat}"]) / m[f"seconds_{stat}"]})  # fmt: skip
        check["holdout"][name] = rows
    check["max_abs_rel_error"] = max(abs(r["rel_error"]) for r in check["holdout"]["best"])
    (out / "check.json").write_text(json.dumps(check, indent=1))
    check["fit_output"] = fit_text
    return check


@click.command()
@click.option("--rate", default="10mbit", show_default=True, help="tbf rate of the link a->b.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--max-bytes", type=click.IntRange(min=4096), default=2_000_000, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--stat", type=click.Choice(["median", "min"]), default="min", show_default=True)
@click.option(
    "--peakrate/--no-peakrate",
    default=True,
    show_default=True,
    help="Cap the tbf's burst at 1% above the rate (psrv cluster's plain tbf lets its 2-frame burst "
    "through at once after each idle gap, so messages under ~4 KB cost no transmission time).",
)
def main(rate: str, out_dir: str, max_bytes: int, repeat: int, stat: str, peakrate: bool) -> None:
    try:
        bps = shaping.parse_rate(rate)
    except shaping.ShapingError as exc:
        raise click.BadParameter(str(exc), param_hint="--rate") from None
    if bps is None:
        raise click.BadParameter("give a rate (e.g. 10mbit)", param_hint="--rate")
    try:
        check = fit_and_check(bps, Path(out_dir), max_bytes, repeat, peak=peakrate, stat=stat)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(check.pop("fit_output"))
    click.echo(f"held-out sizes ({check['link']}), top-level fit {check['fit']}:")
    for r in check["holdout"]["best"]:
        click.echo(f"  {r['wire_bytes']:>9} B  measured {r['measured_s']:.5f} s  predicted {r['predicted_s']:.5f} s  "
                   f"{100 * r['rel_error']:+.1f}%")  # fmt: skip
    click.echo(f"max |relative error| {100 * check['max_abs_rel_error']:.1f}%  ({check['seconds']:.0f} s of probing)")


if __name__ == "__main__":
    main()
