"""Translators on the Hugging Face Hub: push a verified directory, load ``"org/name"`` as a directory.

Why ``huggingface_hub`` and not a copy of its logic: it handles authentication, large files, revisions and
resumable downloads. What stays ours is integrity: a directory is verified against ``translator.json`` before
it is pushed, and a download is verified by ``Translator.from_pretrained`` exactly like a local directory (the
hub's own checksums cover transport; ours cover what was exported). Downloads go to real files in a local
directory (``local_dir``), not to the cache's symlinks, so the verified paths are the ones loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# ``snapshot_download(local_dir=...)`` keeps its download metadata in this folder of the local directory; no loader
# reads it, so the strict "only listed files" check of a downloaded translator skips it (and only it).
HUB_METADATA_DIR = ".cache/huggingface"


def is_repo_id(path: str | Path) -> bool:
    """``"org/name"`` that is not an existing local path."""
    s = str(path)
    return bool(_REPO_ID.match(s)) and not Path(s).exists() and ".." not in s


def default_download_dir(repo_id: str, revision: str | None = None) -> Path:
    """``$DDSTRANS_HOME/translators/<org>--<name>[@revision]`` (default ``~/.cache/ddstrans``)."""
    home = Path(os.environ.get("DDSTRANS_HOME", Path.home() / ".cache" / "ddstrans"))
    name = repo_id.replace("/", "--") + (f"@{revision}" if revision else "")
    return home / "translators" / name


def download(repo_id: str, *, revision: str | None = None, local_dir: str | Path | None = None,
             token: str | None = None) -> Path:
    """Download a translator repository with ``huggingface_hub.snapshot_download``; returns its directory."""
    from huggingface_hub import snapshot_download

    target = Path(local_dir) if local_dir else default_download_dir(repo_id, revision)
    path = snapshot_download(repo_id=repo_id, revision=revision, local_dir=str(target), token=token,
                             repo_type="model")
    return Path(path)


def resolve_translator_path(path: str | Path, *, revision: str | None = None) -> Path:
    """A local directory as is; a hub repository id downloaded (see ``download``)."""
    if is_repo_id(path):
        return download(str(path), revision=revision)
    return Path(path)


def upload_translator(folder: str | Path, repo_id: str, files: Iterable[str], *, token: str | None = None,
                      private: bool = False, revision: str | None = None,
                      commit_message: str = "Upload ddstrans translator", api=None) -> str:
    """Create ``repo_id`` if needed and upload ``translator.json`` and ``files`` of ``folder`` (nothing else).
    ``Translator.push_to_hub`` verifies the folder first. Returns the commit URL. ``api``: an ``HfApi``
    (default: ``HfApi(token=token)``)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                             commit_message=commit_message, allow_patterns=["translator.json", *files])
    return str(getattr(info, "commit_url", info))
