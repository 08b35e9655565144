"""DatasetService: maximally-activating patches, galleries with nearest neighbours, PCA / t-SNE embeddings."""

from __future__ import annotations

import numpy as np

from convscope.v1 import dataset_pb2, dataset_pb2_grpc, tensor_pb2
from convscope_server import render
from convscope_server.datasets import (DataRoot, batches, count_images, folder_items, limited, load_file,
                                       stream_items)
from convscope_server.errors import InvalidArgument, ResourceExhausted
from convscope_server.forward import activations as acts
from convscope_server.forward import patches as top
from convscope_server.forward.backend import OrtBackend
from convscope_server.api.common import positive
from convscope_server.api.streaming import stream_job
from convscope_server.tensors import to_tensor


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
            folder = data_root.folder(source.dataset)
            count = count_images(folder)
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


def _item_error(failure) -> dataset_pb2.ItemError:
    return dataset_pb2.ItemError(index=failure.index, id=failure.id, reason=failure.reason)


def _progress(step: int, total: int, stage: str) -> tensor_pb2.Progress:
    return tensor_pb2.Progress(step=step, total=max(total, step), stage=stage)


def channel_count(layer, field: str) -> int:
    """Channels of a spatial (N, C, H, W) / (N, H, W, C) tensor, or axis 1 of a non-spatial one."""
    if layer.spatial is not None and len(layer.shape) == 4:
        channels = layer.shape[3] if layer.layout == "NHWC" else layer.shape[1]
    elif len(layer.shape) >= 2:  # not spatial (after global pooling): every unit sees the whole image
        channels = layer.shape[1]
    else:
        raise InvalidArgument(field, f"{layer.name!r} has shape {list(layer.shape)}; patches need a spatial "
                              "(N, C, H, W) tensor or an (N, C, ...) one")
    if channels <= 0:
        raise InvalidArgument(field, f"{layer.name!r} has no static channel count in the graph")
    return channels


class DatasetService(dataset_pb2_grpc.DatasetServiceServicer):
    def __init__(self, repository, data_root: DataRoot, limits):
        self.repository = repository
        self.data_root = data_root
        self.limits = limits

    def _model(self, name: str, field: str):
        if not name:
            raise InvalidArgument(field, "required: name a model from ListModels")
        return self.repository.get(name, field)

    def ListDatasets(self, request, context):
        root = self.data_root.root
        return dataset_pb2.ListDatasetsResponse(
            data_root=str(root) if root else "",
            datasets=[dataset_pb2.DatasetSummary(name=d.name, images=d.images, labels=d.labels)
                      for d in self.data_root.summaries()])

    # -- maximally-activating patches -----------------------------------------------------------------
    def TopPatches(self, requests, context):
        spec = first_spec(requests, "TopPatches")
        model = self._model(spec.model, "spec.model")
        if not spec.layer:
            raise InvalidArgument("spec.layer", "required: name a tensor (see DescribeModel)")
        layer = model.layer(spec.layer, "spec.layer")
        width = channel_count(layer, "spec.layer")
        for i, channel in enumerate(spec.channels):
            if not 0 <= channel < width:
                raise InvalidArgument(f"spec.channels[{i}]", f"{channel} is outside {layer.name!r}'s channels "
                                      f"0..{width - 1}")
        channels = np.asarray(list(dict.fromkeys(spec.channels)) or range(width), np.int64)
        k = positive(spec.k, 9, "spec.k")
        if k > self.limits.max_top_k:
            raise ResourceExhausted(f"spec.k: {k} is over the server's limit of {self.limits.max_top_k} (--max-top-k)")
        render_channels = positive(spec.render_channels, 16, "spec.render_channels")
        tile = positive(spec.tile_size, 64, "spec.tile_size")
        if tile > 512:
            raise InvalidArgument("spec.tile_size", f"{tile} is over 512 pixels")
        height, width_px = model.config.height, model.config.width
        spatial = layer.spatial if len(layer.shape) == 4 and layer.layout else None
        if spec.patches:
            side_h = min(height, spatial.h.size) if spatial else height
            side_w = min(width_px, spatial.w.size) if spatial else width_px
            worst = len(channels) * k * side_h * side_w * 3
            if worst > self.limits.max_message_bytes * 0.9:
                raise ResourceExhausted(f"spec.patches: {len(channels)} channels x {k} patches of up to {side_h}x"
                                        f"{side_w} pixels could reach {worst / 2**20:.0f} MiB, over the message "
                                        f"limit of {self.limits.max_message_bytes / 2**20:.0f} MiB; track fewer "
                                        "channels (spec.channels) or leave out the pixels")
        source = ScanSource(spec.source, requests, model, self.data_root, self.limits)
        backend = OrtBackend(model, self.limits.ort_batch)
        grid_width = (layer.shape[2] if layer.layout == "NHWC" else layer.shape[3]) if spatial else 1

        def work(progress, should_stop, emit):
            table = top.TopActivations(channels, k)
            kept: dict[int, tuple] = {}  # scan index -> (id, file path or display pixels) of the images kept
            failures = []

            def failed(failure):
                failures.append(failure.index)
                emit("item_error", failure)

            done = 0
            for batch in batches(source.items, self.limits.ort_batch, failed, should_stop):
                values = backend.tensors(batch.inputs, [layer.name])[layer.name]
                table.add(acts.channels_first(values, layer.layout), batch.indices)
                keep = table.referenced()
                for row, index in enumerate(batch.indices):
                    if index in keep:
                        pixels = batch.paths[row] or render.display_image(batch.inputs[row], model.config)
                        kept[index] = (batch.ids[row], pixels)
                for index in [i for i in kept if i not in keep]:
                    del kept[index]
                done = batch.indices[-1] + 1
                progress(done, source.total, "scanning")
            if should_stop():
                return None
            scanned = max(done, (max(failures) + 1) if failures else 0)
            return self._patch_result(spec, model, layer, table, kept, spatial, grid_width, scanned,
                                      len(failures), render_channels, tile)

        for kind, value in stream_job(context, work, self.limits.max_job_seconds, emits=True):
            if kind == "progress":
                yield dataset_pb2.TopPatchesEvent(progress=_progress(value[0], value[1], value[2]))
            elif kind == "item_error":
                yield dataset_pb2.TopPatchesEvent(item_error=_item_error(value))
            elif value is not None:
                yield dataset_pb2.TopPatchesEvent(result=value)

    def _patch_result(self, spec, model, layer, table, kept, spatial, grid_width, scanned, skipped,
                      render_channels, tile):
        height, width = model.config.height, model.config.width
        images: dict[int, np.ndarray] = {}

        def pixels(index: int) -> np.ndarray:
            if index not in images:
                source = kept[index][1]
                if isinstance(source, np.ndarray):
                    images[index] = source
                else:  # a dataset file: decoded again, only for the winners
                    sample = load_file(source, self.data_root.root, model.config, self.limits.max_image_pixels)
                    images[index] = render.display_image(sample, model.config)
            return images[index]

        result = dataset_pb2.TopPatchesResult(layer=layer.name, images=scanned, skipped=skipped,
                                              execution_provider=model.execution_provider)
        crops: dict[int, list[np.ndarray]] = {}
        for column, channel in enumerate(table.channels.tolist()):
            entry = result.channels.add(channel=channel)
            for slot in range(len(table.values)):
                index = int(table.images[slot, column])
                box = top.receptive_box(spatial, table.positions[slot, column], grid_width, height, width)
                row, col = divmod(int(table.positions[slot, column]), grid_width) if spatial else (0, 0)
                hit = entry.hits.add(index=index, id=kept[index][0], value=float(table.values[slot, column]),
                                     row=row, col=col, top=box.top, left=box.left, bottom=box.bottom,
                                     right=box.right)
                if spec.patches or spec.render:
                    patch = top.crop(pixels(index), box)
                    if spec.patches:
                        to_tensor(patch, out=hit.patch)
                    crops.setdefault(column, []).append(patch)
        if spec.render and len(table.values):
            if spec.channels:
                shown = list(range(len(table.channels)))[:render_channels]
            else:
                shown = np.argsort(-table.values[0], kind="stable")[:render_channels].tolist()
            result.grid_png = render.png(top.patch_grid([crops[c] for c in shown], tile))
            result.grid_channels.extend(int(table.channels[c]) for c in shown)
        return result
