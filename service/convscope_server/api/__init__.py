"""gRPC servicers: proto messages <-> domain objects. No maths here."""
