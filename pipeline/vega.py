"""``dvc plots show`` offline: an HTML template with the Vega libraries inlined, which DVC is configured to use.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so on a machine without internet (the
mode this project promises) the page it writes is blank. This module builds ``.dvc/plots/offline.html``:
DVC's page with the three libraries' minified builds inlined (the exact versions DVC's page asks the CDN
for), and no ``{scripts}`` placeholder, so DVC adds no CDN tag. ``.dvc/config`` points ``plots.html_template``
at it (a path relative to ``.dvc/``), so plain ``dvc plots show`` / ``dvc plots diff`` / ``dvc exp show
--html`` pages open from a file with no network.

    python -m pipeline.vega            # run by `make install`; a no-op when the template is up to date

The libraries come from the npm registry (a package registry, reachable where the project is installed),
pinned by version and checked against the registry's SHA-512 integrity before anything is written; a
mismatch stops with the package named. The template is a build product (gitignored), written atomically.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

from pipeline.outputs import write_atomic

# name -> (version, file inside the package, npm dist.integrity): the versions dvc-render's VegaRenderer.SCRIPTS loads.
PACKAGES = {
    "vega": ("5.20.2", "package/build/vega.min.js",
             "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw=="),
    "vega-lite": ("5.2.0", "package/build/vega-lite.min.js",
                  "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw=="),
    "vega-embed": ("6.18.2", "package/build/vega-embed.min.js",
                   "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg=="),
}
REGISTRY = "https://registry.npmjs.org"
TEMPLATE = Path(".dvc/plots/offline.html")
MARKER = "<!-- posttrain offline template: {} -->"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC Plot (offline)</title>
    <meta charset="utf-8">
    %s
    %s
    <style>
        body { font-family: system-ui, sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def fetch(name: str) -> str:
    """The minified build of one pinned package, downloaded from the npm registry and integrity-checked."""
    version, member, integrity = PACKAGES[name]
    url = f"{REGISTRY}/{name}/-/{name}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        blob = response.read()
    got = "sha512-" + base64.b64encode(hashlib.sha512(blob).digest()).decode()
    if got != integrity:
        raise ValueError(f"{name}@{version}: the downloaded tarball's integrity {got} is not the pinned {integrity}")
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as archive:
        return archive.extractfile(member).read().decode("utf-8")


def fingerprint() -> str:
    return ",".join(f"{name}@{version}" for name, (version, _, _) in PACKAGES.items())


def build(path: Path = TEMPLATE, force: bool = False) -> bool:
    """Write the offline template at ``path`` unless it is there for the same pins; True when written."""
    marker = MARKER.format(fingerprint())
    if not force and path.is_file() and marker in path.read_text(encoding="utf-8"):
        return False
    scripts = []
    for name in PACKAGES:
        code = fetch(name).replace("</script", "<\\/script")  # nothing in the code may close the tag
        for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}"):
            if placeholder in code:
                raise ValueError(f"{name}: its code contains DVC's placeholder {placeholder}")
        scripts.append(f"<script>/* {name}@{PACKAGES[name][0]} */\n{code}\n</script>")
    write_atomic(path, PAGE % (marker, "\n".join(scripts)))
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the offline HTML template for `dvc plots show`.")
    parser.add_argument("--out", default=str(TEMPLATE), help="where DVC's plots.html_template points (.dvc/config)")
    parser.add_argument("--force", action="store_true", help="download and write even when up to date")
    args = parser.parse_args()
    try:
        written = build(Path(args.out), args.force)
    except (OSError, ValueError) as err:
        sys.exit(f"error: the offline plots template: {err}")
    print(f"{args.out}: {'written' if written else 'up to date'} ({fingerprint()})")


if __name__ == "__main__":
    main()
