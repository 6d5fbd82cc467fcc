"""The Dockerfile builds under docker, podman and buildah alike (no engine runs here, so it is read, not built):
fully qualified base images, no network-fetched syntax frontend, and the two targets the README names."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_base_images_are_fully_qualified_and_no_frontend_is_fetched():
    dockerfile = (REPO / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert bases and all(re.match(r"[a-z0-9.-]+\.[a-z]+/", base) for base in bases), bases
    assert not re.search(r"^#\s*syntax\s*=", dockerfile, re.M | re.I)
    targets = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, re.M)
    assert {"cpu", "cuda"} <= set(targets) and targets[-1] == "cuda"
    readme = (REPO / "README.md").read_text()
    assert "docker build --target cpu" in readme and "docker build -t mamba-extend-server ." in readme
