"""Hugging Face Hub integration: upload a finished checkpoint folder. ``save_pretrained(..., push_to_hub=True)``,
``model.push_to_hub(repo_id)`` of a pruned model and ``hf-prune push DIR REPO_ID`` all go through `push_folder`,
after hf_prune has written every file (weights, ``README.md`` model card, ``sparsity.png``,
``pruning_report.json``, the ``trust_remote_code`` file), so the repo gets exactly the folder ``from_pretrained``
reads locally.

Example:
    >>> HUB_KWARGS[:2]
    ('push_to_hub', 'repo_id')
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["HUB_KWARGS", "DEFAULT_COMMIT_MESSAGE", "push_folder", "upload_folder"]

#: ``save_pretrained`` keywords that belong to the upload, not to the files
HUB_KWARGS = ("push_to_hub", "repo_id", "commit_message", "commit_description", "create_pr", "private", "revision")
DEFAULT_COMMIT_MESSAGE = "Upload pruned model (hf_prune)"


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                commit_message: str | None = None, commit_description: str | None = None,
                revision: str | None = None, create_pr: bool = False, token: str | bool | None = None,
                tags: list[str] | None = None) -> Any:
    """Create the model repo ``repo_id`` if needed and upload ``folder`` as one commit; return the commit info.

    Before the upload, the model card (`hf_prune.card.write_model_card`) of a pruned checkpoint is (re)written
    in ``folder`` for the final repo id (its loading examples name it; ``tags`` are added to its metadata), and
    the plot is drawn if missing. A ``README.md`` the user wrote is uploaded as it is.

    ``revision``: the branch to commit to (created from the default branch if it does not exist yet, unless
    ``create_pr``); ``create_pr``: open a pull request instead of committing to the branch. A ``repo_id`` without
    a namespace goes to the token owner's namespace (the Hub answers with the full id).

    Example:
        >>> # push_folder("out/llama-wanda", "me/llama-wanda-50", private=True)  # needs a Hub token
        >>> push_folder.__name__
        'push_folder'
    """
    import huggingface_hub

    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} has no config.json: pass a folder written by save_pretrained")
    repo_id = huggingface_hub.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    _refresh_card(folder, repo_id, tags)
    if revision and revision != "main" and not create_pr:
        huggingface_hub.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    return huggingface_hub.upload_folder(repo_id=repo_id, folder_path=folder, token=token,
                                         commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                                         commit_description=commit_description, create_pr=create_pr,
                                         revision=revision)


def _refresh_card(folder: str, repo_id: str, tags: list[str] | None) -> None:
    import json

    from ..card import PLOT_FILE, write_model_card
    from ..io.save import CARD_FILE, REPORT_FILE, is_generated_card

    card = os.path.join(folder, CARD_FILE)
    if os.path.exists(card) and not is_generated_card(card):
        return  # the user's own README.md goes up as it is
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
        pruned = bool(json.load(fh).get("pruning_config")) or os.path.isfile(os.path.join(folder, REPORT_FILE))
    if pruned:
        write_model_card(folder, tags=tags, repo_id=repo_id, plot=not os.path.isfile(os.path.join(folder, PLOT_FILE)))


def upload_folder(folder: str | os.PathLike, hub: dict[str, Any], token: str | bool | None) -> Any:
    """`push_folder` with ``save_pretrained``'s keywords (``hub``: the `HUB_KWARGS` given); without ``repo_id``
    the folder's name is the repo name, as in transformers.

    Example:
        >>> upload_folder.__name__
        'upload_folder'
    """
    repo_id = hub.get("repo_id") or os.path.basename(os.path.normpath(os.fspath(folder)))
    return push_folder(folder, repo_id, private=hub.get("private"), commit_message=hub.get("commit_message"),
                       commit_description=hub.get("commit_description"), revision=hub.get("revision"),
                       create_pr=bool(hub.get("create_pr", False)), token=token)
