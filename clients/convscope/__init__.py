"""convscope client: inspect convolutional networks served by a convscope server.

    from convscope import Client
    with Client("localhost:50051") as c:
        print(c.predict("efficientnet_lite0", "cat.jpg", top=5))
"""

from convscope.client import (ClassScore, Client, Layer, ModelDescription, ModelSummary,
                              ReceptiveField)
from convscope.errors import (AlreadyExists, Cancelled, ConvscopeError, DeadlineExceeded, FailedPrecondition, Internal,
                              InvalidArgument, NotFound, ResourceExhausted, Unauthenticated, Unavailable)

__version__ = "0.1.0"

__all__ = [
    "Client", "ClassScore", "Layer", "ModelDescription", "ModelSummary", "ReceptiveField",
    "ConvscopeError", "InvalidArgument", "NotFound", "ResourceExhausted", "FailedPrecondition",
    "AlreadyExists", "Unauthenticated", "Unavailable", "DeadlineExceeded", "Cancelled", "Internal",
]
