"""Scan plumbing the DatasetService and AuditService RPCs share: the spec first in the request stream, the
image source (a dataset folder or streamed items, checked before work starts), where the scan runs (this
server or the Ray cluster) and the scan's events on the wire."""

from __future__ import annotations

from convscope.v1 import dataset_pb2, tensor_pb2
from convscope_server.api.common import channel_axis
from convscope_server.datasets import DataRoot, count_images, folder_items, limited, stream_items
from convscope_server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted


def first_spec(requests, kind: str):
    """The spec carried by the first message of a scan's request stream."""
    try:
        first = next(requests)
    except StopIteration:
        raise InvalidArgument("spec", "the request stream is empty; send the spec first") from None
    if first.WhichOneof("part") != "spec":
        raise InvalidArgument("spec", f"the first message must carry the {kind} spec, then the images")
    return first.spec


class ScanSource:
    """A spec's image source, checked before any work starts: the items, their count when known."""

    def __init__(self, source, requests, model, data_root: DataRoot, limits):
        if source.limit < 0:
            raise InvalidArgument("spec.source.limit", f"must be >= 0, got {source.limit}")
        if source.expected < 0:
            raise InvalidArgument("spec.source.expected", f"must be >= 0, got {source.expected}")
        if source.limit > limits.max_scan_images:
            raise ResourceExhausted(f"spec.source.limit: {source.limit} images is over the server's limit of "
                                    f"{limits.max_scan_images} (--max-scan-images)")
        config, max_pixels = model.config, limits.max_image_pixels
        if source.dataset:
            folder = data_root.folder(source.dataset, "spec.source.dataset")
            count = count_images(folder, data_root.root)
            if count == 0:
                raise InvalidArgument("spec.source.dataset", f"{source.dataset!r} holds no images")
            self.total = min(count, source.limit) if source.limit else count
            if self.total > limits.max_scan_images:
                raise ResourceExhausted(f"spec.source.dataset: {source.dataset!r} holds {count} images, over the "
                                        f"server's limit of {limits.max_scan_images}; set source.limit")
            items = folder_items(folder, data_root.root, config, max_pixels)
            self.name = source.dataset
        else:
            items = stream_items(requests, config, max_pixels)
            self.total = min(source.expected, source.limit) if source.limit else source.expected
            self.name = "stream"
        self.items = limited(items, source.limit, limits.max_scan_images)


def on_cluster(source, cluster, field: str = "spec.source.placement") -> bool:
    """Whether a scan of ``source`` runs on the Ray cluster: PLACEMENT_CLUSTER asks for it (FAILED_PRECONDITION
    on a server without one; INVALID_ARGUMENT for streamed images, which the workers cannot read),
    PLACEMENT_SERVER refuses it, PLACEMENT_DEFAULT follows --ray-by-default for dataset folders."""
    placement = source.placement
    if placement not in (dataset_pb2.PLACEMENT_DEFAULT, dataset_pb2.PLACEMENT_SERVER, dataset_pb2.PLACEMENT_CLUSTER):
        raise InvalidArgument(field, f"unknown placement {placement}; give PLACEMENT_DEFAULT, PLACEMENT_SERVER or "
                              "PLACEMENT_CLUSTER")
    if placement == dataset_pb2.PLACEMENT_CLUSTER:
        if cluster is None:
            raise FailedPrecondition(f"{field}: PLACEMENT_CLUSTER asks for a Ray cluster and this server has none "
                                     "(start it with --ray auto|ADDRESS|local and the distributed extra); leave "
                                     "placement unset or give PLACEMENT_SERVER")
        if not source.dataset:
            raise InvalidArgument(field, "the Ray cluster reads dataset folders (source.dataset) that its workers "
                                  "also see; streamed images are scanned on this server: leave placement unset")
        return True
    return (placement == dataset_pb2.PLACEMENT_DEFAULT and cluster is not None and cluster.by_default
            and bool(source.dataset))


def scan_events(event_type, job, to_result):
    """A scan job's events as ``event_type`` messages: progress, one ItemError per unreadable image, then
    ``to_result(result)``."""
    for kind, value in job:
        if kind == "progress":
            step, total, stage = value[:3]
            yield event_type(progress=tensor_pb2.Progress(step=step, total=max(total, step), stage=stage))
        elif kind == "item_error":
            yield event_type(item_error=dataset_pb2.ItemError(index=value.index, id=value.id, reason=value.reason))
        elif value is not None:
            yield event_type(result=to_result(value))


def channel_count(layer, field: str) -> tuple[int, int]:
    """(channel axis, channel count) of ``layer``: the axis its layout names (NCHW 1, NHWC 3), axis 1 of a
    vector or a Conv output, the only long axis of a pooled tensor; INVALID_ARGUMENT when it cannot be told
    (never a guessed axis) or the count is not static."""
    if len(layer.shape) < 2:
        raise InvalidArgument(field, f"{layer.name!r} has shape {list(layer.shape)}; patches need a spatial "
                              "(N, C, H, W) tensor or an (N, C, ...) one")
    axis = channel_axis(layer, field)
    channels = layer.shape[axis]
    if channels <= 0:
        raise InvalidArgument(field, f"{layer.name!r} has no static channel count in the graph")
    return axis, channels
