"""DatasetService's gallery RPCs (BuildGallery, ListGalleries, DeleteGallery, NearestNeighbors, Embed),
mixed into :class:`convscope_server.api.dataset_service.DatasetService`: one gRPC service in the proto, two
modules here."""

from __future__ import annotations

import time

import numpy as np

from convscope.v1 import dataset_pb2, tensor_pb2
from convscope_server import distributed, render
from convscope_server.api.common import (check_finite, finite, non_negative, positive, seconds_left, single_input,
                                         stream_within)
from convscope_server.api.model_service import require_model
from convscope_server.api.scans import ScanSource, first_spec, on_cluster, scan_events
from convscope_server.datasets import batches, no_readable_images
from convscope_server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from convscope_server.forward import embedding as embed
from convscope_server.forward.backend import OrtBackend
from convscope_server.forward.neighbors import neighbor_grid, nearest, thumbnail
from convscope_server.memory import Budget
from convscope_server.onnx.graph import classifier_input
from convscope_server.tensors import to_tensor


class GalleryMethods:
    """Needs ``repository``, ``data_root``, ``galleries``, ``limits`` and ``cluster`` on the servicer."""

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
                done, failures = 0, []

                def failed(failure):
                    failures.append(failure)
                    emit("item_error", failure)
                if remote:
                    items = list(source.items)

                    def write(indices, rows):
                        writer.add(rows["code"], rows["thumbnail"], [items[i].id for i in indices],
                                   [items[i].label for i in indices], rows["predicted"])

                    plan = distributed.gallery_plan(model, layer.name, side, self.data_root.root,
                                                    self.limits.max_image_pixels)
                    report = self.cluster.run(plan, distributed.probe_bytes(model, outputs), items, write,
                                              failed, progress, should_stop, "encoding on the Ray cluster")
                    done = report.merged
                else:
                    for batch in batches(source.items, model.run_batch, failed, should_stop,
                                         self.limits.decode_workers):
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
                    raise no_readable_images(failures)
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
