"""Generated gRPC stubs for the convscope.v1 API (scripts/gen_protos writes them from protos/)."""
