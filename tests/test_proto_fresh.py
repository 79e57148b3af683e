"""The generated code in psrv/v1 must match protos/: regenerate with

python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/psrv/v1/psrv.proto
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

grpc_tools = pytest.importorskip("grpc_tools")
from google.protobuf import descriptor_pb2  # noqa: E402
from grpc_tools import protoc  # noqa: E402

from psrv.v1 import psrv_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROTO = "psrv/v1/psrv.proto"


def _protoc(*args: str) -> None:
    assert protoc.main(["protoc", f"-I{ROOT / 'protos'}", *args, str(ROOT / "protos" / PROTO)]) == 0


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


def _version(text: str) -> str | None:
    m = re.search(r"(Protobuf Python Version: \S+|GRPC_GENERATED_VERSION = \S+)", text)
    return m.group(1) if m else None


@pytest.mark.parametrize("name", ["psrv_pb2.py", "psrv_pb2_grpc.py", "psrv_pb2.pyi"])
def test_generated_files_identical_when_same_generator(tmp_path: Path, name: str) -> None:
    _protoc(f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}")
    fresh = (tmp_path / "psrv" / "v1" / name).read_text()
    committed = (ROOT / "psrv" / "v1" / name).read_text()
    if _version(fresh) != _version(committed):
        pytest.skip(f"installed generator ({_version(fresh)}) differs from the committed one ({_version(committed)})")
    assert fresh == committed, f"psrv/v1/{name} is out of date: regenerate (see this file's docstring)"
