"""DatasetService: maximally-activating patches, galleries with nearest neighbours, PCA / t-SNE embeddings."""

from __future__ import annotations

import time

import numpy as np

from convscope.v1 import dataset_pb2, dataset_pb2_grpc, tensor_pb2
from convscope_server import distributed, render
from convscope_server.datasets import DataRoot, batches, count_images, folder_items, limited, stream_items
from convscope_server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from convscope_server.forward import activations as acts
from convscope_server.forward import embedding as embed
from convscope_server.forward import patches as top
from convscope_server.forward.backend import OrtBackend
from convscope_server.forward.neighbors import neighbor_grid, nearest, thumbnail
from convscope_server.galleries import GalleryStore
from convscope_server.onnx.graph import classifier_input
from convscope_server.api.common import stream_within, channel_axis, check_finite, finite, non_negative, positive, seconds_left, single_input
from convscope_server.memory import Budget
from convscope_server.api.model_service import require_model
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


class DatasetService(dataset_pb2_grpc.DatasetServiceServicer):
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
            kept = {i: (items[i].id, items[i].load) for i in table.referenced()}
            result = self._patch_result(spec, model, layer, table, kept, spatial, grid_width, report.merged,
                                        len(failures), render_channels, tile)
            result.placement = dataset_pb2.PLACEMENT_CLUSTER
            result.execution_provider = report.provider or model.execution_provider
            return result

        def work(progress, should_stop, emit):
            if remote:
                return on_the_cluster(progress, should_stop, emit)
            table = top.TopActivations(channels, k)
            kept: dict[int, tuple] = {}  # scan index -> (id, loader) of the images some channel keeps
            failures = {"count": 0, "end": 0}  # unreadable items, and the scan position after the last one

            def failed(failure):
                failures["count"] += 1
                failures["end"] = failure.index + 1
                emit("item_error", failure)

            done = 0
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
                done = batch.indices[-1] + 1
                progress(done, source.total, "scanning")
            if should_stop():
                return None
            return self._patch_result(spec, model, layer, table, kept, spatial, grid_width,
                                      max(done, failures["end"]), failures["count"], render_channels, tile)

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

    # -- galleries ----------------------------------------------------------------------------------------
    def BuildGallery(self, requests, context):
        started = time.monotonic()
        spec = first_spec(requests, "BuildGallery")
        model = require_model(self.repository, spec.model, "spec.model")
        name = spec.layer or classifier_input(model.proto, model.config.logits_output)
        if not name:
            raise InvalidArgument("spec.layer", "the model has no penultimate layer to default to; name one")
        layer = model.layer(name, "spec.layer")
        dim = int(np.prod(layer.shape[1:])) if len(layer.shape) > 1 and min(layer.shape[1:]) > 0 else 0
        if dim <= 0:
            raise InvalidArgument("spec.layer", f"{layer.name!r} has shape {list(layer.shape)}: a code needs a "
                                  "fixed size per image")
        side = positive(spec.thumbnail_size, 64, "spec.thumbnail_size")
        if side > 256:
            raise InvalidArgument("spec.thumbnail_size", f"{side} is over 256 pixels")
        remote = on_cluster(spec.source, self.cluster)
        source = ScanSource(spec.source, requests, model, self.data_root, self.limits)
        seconds_left(started, self.limits)  # before taking the gallery name
        backend = OrtBackend(model)
        outputs = [layer.name, model.config.logits_output]
        self.galleries.begin(spec.name, spec.overwrite)
        ran = []  # the job frees the name itself once it has started

        def work(progress, should_stop, emit):
            ran.append(True)
            writer, published = None, False
            try:
                writer = self.galleries.writer(dim, side)
                done = 0
                if remote:
                    items = list(source.items)

                    def write(indices, rows):
                        writer.add(rows["code"], rows["thumbnail"], [items[i].id for i in indices],
                                   [items[i].label for i in indices], rows["predicted"])

                    plan = distributed.gallery_plan(model, layer.name, side, self.data_root.root,
                                                    self.limits.max_image_pixels)
                    report = self.cluster.run(plan, distributed.probe_bytes(model, outputs), items, write,
                                              lambda failure: emit("item_error", failure), progress, should_stop,
                                              "encoding on the Ray cluster")
                    done = report.merged
                else:
                    for batch in batches(source.items, model.run_batch, lambda failure: emit("item_error", failure),
                                         should_stop, self.limits.decode_workers):
                        values = backend.tensors(batch.inputs, outputs)
                        thumbs = [thumbnail(render.display_image(x, model.config), side) for x in batch.inputs]
                        writer.add(values[layer.name].reshape(len(batch.inputs), -1), np.stack(thumbs), batch.ids,
                                   batch.labels, values[model.config.logits_output].reshape(len(batch.inputs), -1)
                                   .argmax(axis=1))
                        done = batch.indices[-1] + 1
                        progress(done, source.total, "encoding")
                if should_stop():
                    return None
                if not writer.ids:
                    raise InvalidArgument("spec.source", "no readable images: the gallery would be empty")
                progress(done, source.total, "writing")
                meta = {"model": model.name, "model_fingerprint": model.fingerprint, "layer": layer.name,
                        "source": source.name}
                gallery = self.galleries.publish(spec.name, writer, meta)
                published = True
                return gallery
            finally:
                if not published:  # failed or stopped: drop the temporary files, free the name
                    if writer is not None:
                        writer.discard()
                    self.galleries.release(spec.name)

        try:
            yield from scan_events(dataset_pb2.BuildGalleryEvent,
                                   stream_within(context, work, started, self.limits, emits=True),
                                   lambda g: self._info(g.name))
        finally:
            if not ran:  # refused before the job started (a full job queue, the time limit): free the name
                self.galleries.release(spec.name)

    def _info(self, name: str) -> dataset_pb2.GalleryInfo:
        gallery, error = self.galleries.status(name)
        if gallery is None:
            return dataset_pb2.GalleryInfo(name=name, ready=False, error=error)
        h = gallery.header
        info = dataset_pb2.GalleryInfo(name=name, ready=True, model=h["model"], layer=h["layer"], size=gallery.size,
                                       dim=h["dim"], thumbnail_size=h["thumbnail_size"], source=h["source"],
                                       created=h["created"], file_bytes=gallery.path.stat().st_size)
        problem = self._model_problem(gallery)
        if problem:
            info.ready, info.error = False, problem
        return info

    def _model_problem(self, gallery) -> str:
        model, error = self.repository.status(gallery.header["model"])
        if model is None:
            return f"its model {gallery.header['model']!r} is not loaded" + (f": {error}" if error else "")
        if model.fingerprint != gallery.header["model_fingerprint"]:
            return (f"it was built from a different version of model {model.name!r}; rebuild it "
                    "(BuildGallery with overwrite)")
        return ""

    def ListGalleries(self, request, context):
        return dataset_pb2.ListGalleriesResponse(galleries=[self._info(n) for n in self.galleries.names()])

    def DeleteGallery(self, request, context):
        self.galleries.delete(request.name)
        return dataset_pb2.DeleteGalleryResponse()

    def _ready_gallery(self, name: str):
        gallery = self.galleries.get(name)
        problem = self._model_problem(gallery)
        if problem:
            raise FailedPrecondition(f"gallery: {name!r} cannot be used: {problem}")
        return gallery, self.repository.get(gallery.header["model"])

    def NearestNeighbors(self, request, context):
        gallery, model = self._ready_gallery(request.gallery)
        k = positive(request.k, 5, "k")
        if k > self.limits.max_top_k:
            raise ResourceExhausted(f"k: {k} is over the server's limit of {self.limits.max_top_k} (--max-top-k)")
        metric = {dataset_pb2.METRIC_L2: "l2", dataset_pb2.METRIC_COSINE: "cosine"}.get(request.metric)
        if metric is None:
            raise InvalidArgument("metric", f"unknown metric {request.metric}")
        sample = single_input(model, request, self.limits, Budget())
        layer, logits = gallery.header["layer"], model.config.logits_output
        values = OrtBackend(model).tensors(sample[None], [layer, logits])
        side = gallery.header["thumbnail_size"]
        query_thumb = thumbnail(render.display_image(sample, model.config), side)
        predicted = int(values[logits].reshape(-1).argmax())
        response = dataset_pb2.NearestNeighborsResponse(query_predicted=predicted,
                                                        query_predicted_label=model.label(predicted))
        found = {}
        for space, data, query in (("feature", gallery.codes, values[layer].reshape(-1)),
                                   ("pixel", gallery.thumbnails.reshape(gallery.size, -1), query_thumb.reshape(-1))):
            indices, distances = nearest(data, gallery.squared_norms(space), query, k, metric)
            found[space] = indices
            getattr(response, space).extend(
                dataset_pb2.Neighbor(index=int(i), id=gallery.ids[i], label=gallery.labels[i],
                                     predicted=gallery.predicted[i], distance=float(d))
                for i, d in zip(indices, distances))
        if request.render:
            rows = [[np.asarray(gallery.thumbnails[i]) for i in found[space]] for space in ("feature", "pixel")]
            response.grid_png = render.png(neighbor_grid(query_thumb, rows))
        return response

    # -- embeddings ---------------------------------------------------------------------------------------
    def Embed(self, request, context):
        started = time.monotonic()
        gallery = self.galleries.get(request.gallery)
        method = {dataset_pb2.EMBED_TSNE: "tsne", dataset_pb2.EMBED_PCA: "pca"}.get(request.method)
        if method is None:
            raise InvalidArgument("method", f"unknown method {request.method}")
        non_negative(request.max_points, "max_points")
        seed = non_negative(request.seed, "seed")
        count = min(gallery.size, request.max_points) if request.max_points else gallery.size
        if count > self.limits.max_embed_points:
            raise ResourceExhausted(f"gallery: {count} points is over the server's limit of "
                                    f"{self.limits.max_embed_points} per embedding (--max-embed-points); set "
                                    "max_points to embed a random subset")
        if count < 4:
            raise InvalidArgument("gallery", f"{request.gallery!r} has {count} images; an embedding needs 4 or more")
        iterations = positive(request.iterations, 750, "iterations")
        if iterations > self.limits.max_steps:
            raise ResourceExhausted(f"iterations: {iterations} is over the server's limit of {self.limits.max_steps}")
        if iterations < 50:
            raise InvalidArgument("iterations", f"{iterations} is too few; give 50 or more")
        perplexity = min(finite(request.perplexity, "perplexity", 1.0, 10_000.0, default=30.0), (count - 1) / 3)
        grid = positive(request.grid_size, 20, "grid_size")
        if not 2 <= grid <= 48:
            raise InvalidArgument("grid_size", f"{grid} cells per side; give 2 to 48")
        rng = np.random.default_rng(seed)
        indices = (np.sort(rng.choice(gallery.size, count, replace=False)) if count < gallery.size
                   else np.arange(gallery.size))
        model, _ = self.repository.status(gallery.header["model"])

        def name(c: int) -> str:
            return model.label(c) if model is not None else f"class {c}"

        def work(progress, should_stop):
            codes = np.asarray(gallery.codes[indices])
            result = dataset_pb2.EmbedResult(method=method, indices=indices.tolist(),
                                             ids=[gallery.ids[i] for i in indices],
                                             predicted=[gallery.predicted[i] for i in indices],
                                             labels=[gallery.labels[i] for i in indices])
            if method == "pca":
                coordinates, ratio = embed.pca(codes, seed)
                ratio = np.nan_to_num(ratio, nan=0.0)  # codes without any variance: 0 / 0
                to_tensor(ratio.astype(np.float32), out=result.explained_variance_ratio)
            else:
                try:
                    coordinates, result.kl_divergence = embed.tsne(
                        codes, perplexity, iterations, seed,
                        lambda step, total, kl: progress(step, total, "t-SNE", kl), should_stop)
                except embed.Stopped:
                    return None
                except (ValueError, FloatingPointError, ZeroDivisionError) as error:
                    raise InvalidArgument("perplexity", f"t-SNE failed on these codes with perplexity {perplexity:g}: "
                                          f"{error}") from None
            check_finite([coordinates, result.kl_divergence], "gallery",
                         "the gallery's codes hold NaN or infinite values, or have no spread")
            to_tensor(coordinates, out=result.coordinates)
            if request.render:
                classes = list(result.predicted)
                title = (f"{'PCA' if method == 'pca' else 't-SNE'} of {gallery.name} ({gallery.header['layer']}), "
                         "colour: predicted class")
                result.scatter_png = render.png(embed.scatter(coordinates, classes, name, title))
                shown = (np.sort(rng.choice(count, grid * grid, replace=False)) if count > grid * grid
                         else np.arange(count))
                cells = embed.snap_to_grid(coordinates[shown], grid)
                thumbs = [np.asarray(gallery.thumbnails[indices[i]]) for i in shown]
                result.grid_png = render.png(embed.image_grid(thumbs, cells, grid))
            return result

        for kind, value in stream_within(context, work, started, self.limits):
            if kind == "progress":
                yield dataset_pb2.EmbedEvent(progress=tensor_pb2.Progress(step=value[0], total=value[1],
                                                                         stage=value[2], loss=value[3]))
            elif value is not None:
                yield dataset_pb2.EmbedEvent(result=value)
