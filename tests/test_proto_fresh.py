"""The generated code in psrv/v1 must match protos/ and the pinned generator: regenerate with

python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. protos/psrv/v1/psrv.proto

using the grpcio-tools version pinned in pyproject.toml's dev extra (``pip install -e '.[dev]'``).
No gRPC stubs (``--grpc_python_out``): psrv.rpc builds its method table from the service descriptor.
A different generator version is a failure, not a skip, so stale generated code cannot pass CI.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from psrv.v1 import psrv_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTO = "psrv/v1/psrv.proto"
GENERATED = ["psrv_pb2.py", "psrv_pb2.pyi"]


def _pinned_generator() -> str:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    (pin,) = [r for r in dev if r.startswith("grpcio-tools")]
    m = re.fullmatch(r"grpcio-tools==(\S+)", pin)
    assert m, f"pin grpcio-tools exactly in the dev extra (got {pin!r})"
    return m.group(1)


def _protoc(*args: str) -> None:
    assert protoc.main(["protoc", f"-I{ROOT / 'protos'}", *args, str(ROOT / "protos" / PROTO)]) == 0


def test_installed_generator_is_the_pinned_one() -> None:
    pinned, installed = _pinned_generator(), importlib.metadata.version("grpcio-tools")
    assert installed == pinned, f"grpcio-tools {installed} installed, {pinned} pinned: pip install -e '.[dev]'"


def test_descriptor_matches_proto_file(tmp_path: Path) -> None:
    out = tmp_path / "set.pb"
    _protoc(f"--descriptor_set_out={out}")
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in fresh.message_type:  # protoc adds json_name to descriptor sets, not to generated code
        _strip_json_names(message)
    committed = descriptor_pb2.FileDescriptorProto.FromString(psrv_pb2.DESCRIPTOR.serialized_pb)
    assert committed == fresh, "psrv/v1 is out of date with protos/: regenerate (see this file's docstring)"


def _strip_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _strip_json_names(nested)


@pytest.mark.parametrize("name", GENERATED)
def test_generated_files_identical(tmp_path: Path, name: str) -> None:
    _protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}")
    fresh = (tmp_path / "psrv" / "v1" / name).read_text()
    committed = (ROOT / "psrv" / "v1" / name).read_text()
    assert fresh == committed, (
        f"psrv/v1/{name} differs from what grpcio-tools {importlib.metadata.version('grpcio-tools')} generates: "
        "regenerate with the pinned version (see this file's docstring)"
    )


def test_nothing_else_is_generated() -> None:
    assert sorted(p.name for p in (ROOT / "psrv" / "v1").glob("psrv_pb2*")) == GENERATED
