"""Hugging Face Hub integration: upload a finished checkpoint folder (``save_pretrained(..., push_to_hub=True)``
and ``push_to_hub`` of a pruned model go through here, after hf_prune has written every file)."""

from __future__ import annotations

import os
from typing import Any

#: ``save_pretrained`` keywords that belong to the upload, not to the files
HUB_KWARGS = ("push_to_hub", "repo_id", "commit_message", "create_pr", "private", "revision")


def upload_folder(folder: str | os.PathLike, hub: dict[str, Any], token: str | bool | None) -> None:
    """Create the repo if needed and upload ``folder`` as one commit (``hub``: the `HUB_KWARGS` given)."""
    import huggingface_hub

    repo_id = hub.get("repo_id") or os.path.basename(os.path.normpath(os.fspath(folder)))
    repo_id = huggingface_hub.create_repo(repo_id, token=token, private=hub.get("private"), exist_ok=True).repo_id
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), token=token,
                                  commit_message=hub.get("commit_message") or "Upload pruned model (hf_prune)",
                                  create_pr=bool(hub.get("create_pr", False)), revision=hub.get("revision"))
