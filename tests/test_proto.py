"""The committed generated modules match proto/ (regenerate with scripts/gen_proto.sh)."""

from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from potstill.v1 import teacher_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_the_proto_file(tmp_path):
    descriptor_set = tmp_path / "teacher.desc"
    status = protoc.main(
        ["protoc", f"-I{ROOT / 'proto'}", f"--descriptor_set_out={descriptor_set}", "potstill/v1/teacher.proto"]
    )
    assert status == 0
    from_source = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file[0]
    # The embedded descriptor leaves out the derived json_name of each field.
    for message in from_source.message_type:
        for field in message.field:
            field.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto()
    teacher_pb2.DESCRIPTOR.CopyToProto(committed)
    assert committed == from_source


def test_every_field_and_message_is_commented():
    lines = (ROOT / "proto" / "potstill" / "v1" / "teacher.proto").read_text().splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        declares = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("syntax", "option"))
        opens = stripped.startswith(("message ", "enum ", "service ", "rpc ", "oneof "))
        if declares or opens:
            above = lines[number - 1].strip()
            assert above.startswith("//"), f"teacher.proto:{number + 1} has no comment: {stripped}"
