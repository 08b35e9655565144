"""t-SNE on 10,000 real codes: scikit-learn's Barnes-Hut TSNE against openTSNE (its Barnes-Hut and its
FFT-accelerated gradients), and convscope's Embed call itself (openTSNE, Barnes-Hut at this size).

Codes come from a gallery file made by ``dataset_scan.py --keep DIR`` (penultimate-layer codes of Lite0 on
augmented demo photos): ``DIR/galleries/many-50000.gallery``. Both libraries get the same perplexity (30),
750 iterations in all (250 with early exaggeration), PCA initialisation and both cores. Quality: the final
KL divergence each reports, and trustworthiness (k = 10) on a 2,000-point sample.

    .venv/bin/python benchmarks/tsne_speed.py --gallery DIR/galleries/many-50000.gallery [--points 10000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common import start_server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gallery", type=Path, required=True)
    parser.add_argument("--points", type=int, default=10000)
    args = parser.parse_args()

    from openTSNE import TSNE as OpenTSNE
    from sklearn.manifold import TSNE, trustworthiness

    from convscope import Client
    from convscope_server.galleries import read_gallery

    gallery = read_gallery(args.gallery, args.gallery.stem)
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(gallery.size, args.points, replace=False))  # what Embed's max_points picks
    codes = np.asarray(gallery.codes[chosen], np.float32)
    sample = rng.choice(args.points, 2000, replace=False)

    def quality(embedding):
        return trustworthiness(codes[sample], embedding[sample], n_neighbors=10)

    started = time.perf_counter()
    sk = TSNE(n_components=2, perplexity=30, max_iter=750, init="pca", learning_rate="auto", n_jobs=2,
              random_state=0)
    sk_embedding = sk.fit_transform(codes)
    sk_time = time.perf_counter() - started
    print(f"scikit-learn TSNE (Barnes-Hut)  {sk_time:7.1f} s  KL {sk.kl_divergence_:.3f}  "
          f"trustworthiness {quality(sk_embedding):.3f}", flush=True)

    for method, name in (("bh", "Barnes-Hut"), ("fft", "FFT")):
        started = time.perf_counter()
        ot = OpenTSNE(n_components=2, perplexity=30, early_exaggeration_iter=250, n_iter=500, n_jobs=2,
                      negative_gradient_method=method, random_state=0).fit(codes)
        ot_time = time.perf_counter() - started
        print(f"openTSNE ({name + ')':<11}        {ot_time:7.1f} s  KL {ot.kl_divergence:.3f}  "
              f"trustworthiness {quality(np.asarray(ot)):.3f}   vs scikit-learn {sk_time / ot_time:.2f}x", flush=True)

    server = start_server(gallery_root=args.gallery.parent, max_embed_points=args.points)
    try:
        with Client(server.address) as client:
            started = time.perf_counter()
            served = client.embedding(args.gallery.stem, "tsne", max_points=args.points, iterations=750)
            served_time = time.perf_counter() - started
    finally:
        server.stop(0)
    assert np.array_equal(np.asarray(served.indices), chosen)
    print(f"convscope Embed (openTSNE, gRPC) {served_time:6.1f} s  KL {served.kl_divergence:.3f}  "
          f"trustworthiness {quality(served.coordinates):.3f}   vs scikit-learn {sk_time / served_time:.2f}x")


if __name__ == "__main__":
    main()
