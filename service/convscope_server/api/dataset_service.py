"""DatasetService: maximally-activating patches (here), galleries with nearest neighbours and PCA / t-SNE
embeddings (``gallery_methods``)."""

from __future__ import annotations

import time

import numpy as np

from convscope.v1 import dataset_pb2, dataset_pb2_grpc
from convscope_server import distributed, render
from convscope_server.api.common import positive, stream_within
from convscope_server.api.gallery_methods import GalleryMethods
from convscope_server.api.model_service import require_model
from convscope_server.api.scans import ScanSource, channel_count, first_spec, on_cluster, scan_events
from convscope_server.datasets import DataRoot, batches, no_readable_images
from convscope_server.errors import InvalidArgument, ResourceExhausted
from convscope_server.forward import activations as acts
from convscope_server.forward import patches as top
from convscope_server.forward.backend import OrtBackend
from convscope_server.galleries import GalleryStore
from convscope_server.tensors import to_tensor


class DatasetService(GalleryMethods, dataset_pb2_grpc.DatasetServiceServicer):
    def __init__(self, repository, data_root: DataRoot, galleries: GalleryStore, limits, cluster=None):
        self.repository = repository
        self.data_root = data_root
        self.galleries = galleries
        self.limits = limits
        self.cluster = cluster      # distributed.Cluster when the server runs with --ray

    def ListDatasets(self, request, context):
        root = self.data_root.root
        return dataset_pb2.ListDatasetsResponse(
            data_root=str(root) if root else "",
            datasets=[dataset_pb2.DatasetSummary(name=d.name, images=d.images, labels=d.labels)
                      for d in self.data_root.summaries()])

    # -- maximally-activating patches -----------------------------------------------------------------
    def TopPatches(self, requests, context):
        started = time.monotonic()
        spec = first_spec(requests, "TopPatches")
        model = require_model(self.repository, spec.model, "spec.model")
        if not spec.layer:
            raise InvalidArgument("spec.layer", "required: name a tensor (see DescribeModel)")
        layer = model.layer(spec.layer, "spec.layer")
        axis, width = channel_count(layer, "spec.layer")
        for i, channel in enumerate(spec.channels):
            if not 0 <= channel < width:
                raise InvalidArgument(f"spec.channels[{i}]", f"{channel} is outside {layer.name!r}'s channels "
                                      f"0..{width - 1}")
        channels = np.asarray(list(dict.fromkeys(spec.channels)) or range(width), np.int64)
        k = positive(spec.k, 9, "spec.k")
        if k > self.limits.max_top_k:
            raise ResourceExhausted(f"spec.k: {k} is over the server's limit of {self.limits.max_top_k} (--max-top-k)")
        render_channels = positive(spec.render_channels, 16, "spec.render_channels", 1024)
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
        remote = on_cluster(spec.source, self.cluster)
        source = ScanSource(spec.source, requests, model, self.data_root, self.limits)
        backend = OrtBackend(model)
        grid_width = (layer.shape[2] if layer.layout == "NHWC" else layer.shape[3]) if spatial else 1

        def on_the_cluster(progress, should_stop, emit):
            table = top.TopActivations(channels, k)
            items = list(source.items)
            failures = []

            def failed(failure):
                failures.append(failure)
                emit("item_error", failure)

            plan = distributed.patches_plan(model, layer, axis, channels, self.data_root.root,
                                            self.limits.max_image_pixels)
            report = self.cluster.run(plan, distributed.probe_bytes(model, [layer.name]), items,
                                      lambda indices, rows: table.merge(rows["values"], rows["positions"], indices),
                                      failed, progress, should_stop, "scanning on the Ray cluster")
            if should_stop() or report.stopped:
                return None
            readable = report.merged - len(failures)
            if not readable:
                raise no_readable_images(failures)
            kept = {i: (items[i].id, items[i].load) for i in table.referenced()}
            result = self._patch_result(spec, model, layer, table, kept, spatial, grid_width, readable,
                                        len(failures), render_channels, tile)
            result.placement = dataset_pb2.PLACEMENT_CLUSTER
            result.execution_provider = report.provider or model.execution_provider
            return result

        def work(progress, should_stop, emit):
            if remote:
                return on_the_cluster(progress, should_stop, emit)
            table = top.TopActivations(channels, k)
            kept: dict[int, tuple] = {}  # scan index -> (id, loader) of the images some channel keeps
            failures = []
            readable, done, shown = 0, 0, [0]   # shown: the position progress last reported

            def failed(failure):   # on the decode reader's thread (events are a queue)
                failures.append(failure)
                emit("item_error", failure)
                if failure.index + 1 >= shown[0] + model.run_batch:   # a long run of unreadable items shows too
                    shown[0] = failure.index + 1
                    progress(failure.index + 1, source.total, "scanning")

            for batch in batches(source.items, model.run_batch, failed, should_stop,
                                 self.limits.decode_workers):
                values = backend.tensors(batch.inputs, [layer.name])[layer.name]
                table.add(acts.channels_first(values, layer.layout, axis), batch.indices)
                keep = table.referenced()
                for row, index in enumerate(batch.indices):
                    if index in keep:
                        kept[index] = (batch.ids[row], batch.loaders[row])
                for index in [i for i in kept if i not in keep]:
                    del kept[index]
                done, readable = batch.indices[-1] + 1, readable + len(batch.indices)
                shown[0] = max(shown[0], done)   # never backwards past a run of failures already shown
                progress(shown[0], source.total, "scanning")
            if should_stop():
                return None
            if not readable:
                raise no_readable_images(failures)
            progress(max(done, failures[-1].index + 1 if failures else 0), source.total, "scanning")
            return self._patch_result(spec, model, layer, table, kept, spatial, grid_width, readable,
                                      len(failures), render_channels, tile)

        yield from scan_events(dataset_pb2.TopPatchesEvent, stream_within(context, work, started, self.limits,
                                                                       emits=True), lambda result: result)

    def _patch_result(self, spec, model, layer, table, kept, spatial, grid_width, scanned, skipped,
                      render_channels, tile):
        height, width = model.config.height, model.config.width
        images: dict[int, np.ndarray] = {}

        def pixels(index: int) -> np.ndarray:
            if index not in images:  # decoded again (the file, or the bytes as streamed), winners only
                images[index] = render.display_image(kept[index][1](), model.config)
            return images[index]

        result = dataset_pb2.TopPatchesResult(layer=layer.name, images=scanned, skipped=skipped,
                                              execution_provider=model.execution_provider,
                                              placement=dataset_pb2.PLACEMENT_SERVER)
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
                # The channels whose k hits are strongest on average (ReLU6 layers tie at 6 on top values).
                shown = np.argsort(-table.values.mean(axis=0), kind="stable")[:render_channels].tolist()
            result.grid_png = render.png(top.patch_grid([crops[c] for c in shown], tile))
            result.grid_channels.extend(int(table.channels[c]) for c in shown)
        return result
