"""Generated from proto/potstill/v1/teacher.proto by scripts/gen_proto.sh: do not edit."""
