"""convscope client: inspect convolutional networks served by a convscope server.

    from convscope import Client
    with Client("localhost:50051") as c:
        print(c.predict("efficientnet_lite0", "cat.jpg", top=5))

``convscope.geometry`` brings maps from model-input space back to the photo's own size and aspect.
"""

from convscope.client import (Activation, AdversarialExample, Attribution, ClassScore, Client, DeadFilters, Filters,
                              Layer, ModelDescription, ModelSummary, OcclusionResult, ReceptiveField, Robustness,
                              SanityReport, ScoreCamResult, Synthesized, Target)
from convscope.audit_client import AuditInfo
from convscope.dataset_client import (DatasetSummary, Embedding, Gallery, ItemError, Neighbor, Neighbors, PatchHit,
                                      TopPatches)
from convscope.errors import (AlreadyExists, Cancelled, ConvscopeError, DeadlineExceeded, FailedPrecondition, Internal,
                              InvalidArgument, NotFound, ResourceExhausted, Unauthenticated, Unavailable)

__version__ = "0.1.0"

__all__ = [
    "Client", "ClassScore", "Target", "Layer", "ModelDescription", "ModelSummary", "ReceptiveField",
    "Filters", "Activation", "DeadFilters", "OcclusionResult", "ScoreCamResult", "Attribution", "SanityReport",
    "Synthesized", "AdversarialExample", "Robustness",
    "DatasetSummary", "ItemError", "PatchHit", "TopPatches", "Gallery", "Neighbor", "Neighbors", "Embedding",
    "AuditInfo",
    "ConvscopeError", "InvalidArgument", "NotFound", "ResourceExhausted", "FailedPrecondition",
    "AlreadyExists", "Unauthenticated", "Unavailable", "DeadlineExceeded", "Cancelled", "Internal",
]
