"""The HTML page each picture-making command writes: figures with captions that say what to look for.

Nothing touches the disk until :meth:`Page.write`, so a command that fails leaves no (empty) folder.
Beside ``index.html`` the page writes ``page.json``: the command, the model and, per figure, its caption
and the numbers the figure drew (colour-bar range, sizes), for scripts and tests.
"""

from __future__ import annotations

import html
import json
import shlex
import sys
from pathlib import Path

STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;padding:1em 2em;max-width:1400px;background:#fafafa;color:#222}
header code{background:#eee;padding:.2em .4em;border-radius:3px;word-break:break-all}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,560px),1fr));gap:1.5em}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em}
figure.wide{grid-column:1/-1}
figure img{width:100%;height:auto;display:block}
figcaption{font-size:95%;line-height:1.4;margin-top:.6em}
figcaption b{display:block;margin-bottom:.2em}
.files{font-size:90%;color:#555}
table{border-collapse:collapse;margin-top:.5em;font-size:95%}td,th{padding:.2em .8em;border-bottom:1px solid #eee;text-align:left}
"""


class Page:
    """Collects figures and files for ``out/`` and writes them with ``index.html`` and ``page.json``."""

    def __init__(self, out: Path, title: str, model: str = "", intro: str = ""):
        self.out = Path(out)
        self.title, self.model, self.intro = title, model, intro
        self.figures: list[dict] = []
        self.files: dict[str, bytes] = {}

    def image(self, name: str, data: bytes, caption: str, look_for: str = "", info: dict | None = None,
              wide: bool = False) -> str:
        """A picture (PNG or GIF bytes) with its caption and what to look for in it."""
        self.files[name] = data
        self.figures.append({"file": name, "caption": caption, "look_for": look_for, "info": info or {},
                             "wide": wide})
        return name

    def figure(self, name: str, picture, caption: str, look_for: str = "", wide: bool = False) -> str:
        """A :class:`convscope.figures.Picture` (PNG bytes and the numbers it drew)."""
        return self.image(name, picture.png, caption, look_for, picture.info, wide)

    def table(self, title: str, headers: list[str], rows: list[list], caption: str = "") -> None:
        """A table among the figures (a model card, a list of images), full width."""
        self.figures.append({"table": title, "headers": headers, "rows": [[str(c) for c in r] for r in rows],
                             "caption": caption, "look_for": "", "info": {}, "wide": True, "file": ""})

    def links(self, title: str, links: list[tuple[str, str]], caption: str = "") -> None:
        """A card of links to other pages (``(text, relative href)``), full width."""
        self.figures.append({"links": title, "items": [list(link) for link in links], "caption": caption,
                             "look_for": "", "info": {}, "wide": True, "file": ""})

    def file(self, name: str, data: bytes | str) -> None:
        """A data file written beside the page (JSON, CSV), linked at the bottom."""
        self.files[name] = data.encode() if isinstance(data, str) else data

    def write(self, summary: str = "") -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (self.out / name).write_bytes(data)
        command = "convscope " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        figures = "\n".join(self._figure(f) for f in self.figures)
        extra = [n for n in self.files if n not in {f["file"] for f in self.figures}]  # data files, linked
        links = ("<p class=files>Data: " + ", ".join(f'<a href="{html.escape(n)}">{html.escape(n)}</a>'
                                                      for n in extra) + "</p>") if extra else ""
        model = f"<p>Model: <b>{html.escape(self.model)}</b></p>" if self.model else ""
        page = (f"<!doctype html><html lang=en><meta charset=utf-8>"
                f'<meta name=viewport content="width=device-width,initial-scale=1">'
                f"<title>{html.escape(self.title)}</title><style>{STYLE}</style>"
                f"<header><h1>{html.escape(self.title)}</h1>{model}"
                f"<p>Made by <code>{html.escape(command)}</code></p>"
                + (f"<p>{html.escape(self.intro)}</p>" if self.intro else "")
                + (f"<p>{html.escape(summary)}</p>" if summary else "")
                + f"</header><main class=grid>{figures}</main>{links}</html>")
        (self.out / "index.html").write_text(page)
        (self.out / "page.json").write_text(json.dumps(
            {"title": self.title, "model": self.model, "command": command, "summary": summary,
             "figures": self.figures}, indent=1, default=float))
        print(f"wrote {len(self.figures)} picture(s) and {self.out / 'index.html'}")
        return self.out / "index.html"

    @staticmethod
    def _figure(f: dict) -> str:
        if "links" in f:
            items = "".join(f'<li><a href="{html.escape(href)}">{html.escape(text)}</a></li>' for text, href in f["items"])
            return (f"<figure class=wide><b>{html.escape(f['links'])}</b><ul>{items}</ul>"
                    f"<figcaption>{html.escape(f['caption'])}</figcaption></figure>")
        if "table" in f:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in f["headers"]) if any(f["headers"]) else ""
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in f["rows"])
            empty = "" if f["rows"] else "<p>none</p>"
            return (f"<figure class=wide><b>{html.escape(f['table'])}</b><table>"
                    f"{'<tr>' + head + '</tr>' if head else ''}{body}</table>{empty}"
                    f"<figcaption>{html.escape(f['caption'])}</figcaption></figure>")
        look = f"<br>Look for: {html.escape(f['look_for'])}" if f["look_for"] else ""
        return (f'<figure{" class=wide" if f["wide"] else ""}><img src="{html.escape(f["file"])}" '
                f'alt="{html.escape(f["caption"])}" loading=lazy>'
                f"<figcaption><b>{html.escape(f['caption'])}</b>{look}</figcaption></figure>")
