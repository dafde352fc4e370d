"""`vitune push FOLDER --repo ORG/NAME`: a finished run, a merged folder or a folder of GGUF exports
-> a model repository on the Hugging Face Hub, card included.

The story: check the folder (finished, holding a model) -> the token (HF_TOKEN or `hf auth login`)
-> create the repository, or keep it if it exists -> the card: written where the folder has none
(or PEFT's blank one), and written again when it is vitune's own and unedited, so its examples name
the repository (models/card.py) -> the files that go up (`plan_upload`: everything but checkpoints,
tensorboard logs, the run's progress file, the pickled TrainingArguments, the rejected rows and
hidden files) -> one commit of those files (huggingface_hub's `create_commit`). An adapter trained on
a local copy of a Hub model goes up naming that Hub model as its base in adapter_config.json
(`hub_adapter_config`), so PEFT loads it anywhere; the local file is not changed.

The Hub is HF_ENDPOINT's (default https://huggingface.co), read when the command runs. Whatever
goes wrong with the Hub (unreachable, token refused, no permission) is one line naming it.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vitune.errors import UserError
from vitune.models.card import CARD, refresh_card
from vitune.models.lineage import is_hub_id, lineage

# Left out of every upload (huggingface_hub's patterns: a trailing / is a folder, * crosses folders)
LEFT_OUT = ("checkpoint-*/", "tensorboard/", "progress.json", "training_args.bin", "rejects.jsonl", ".*", "*/.*")
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Upload:
    """What `vitune push` sends from a folder."""

    files: list[str]  # paths relative to the folder, sorted
    left_out: list[str]  # what stays home: folders whole ("checkpoint-2/"), files by their path
    bytes: int


def plan_upload(folder: Path) -> Upload:
    """The files of `folder` that go up, chosen by huggingface_hub's own filter (upload_folder's) with LEFT_OUT."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    every = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    files = list(filter_repo_objects(every, ignore_patterns=list(LEFT_OUT)))
    kept, kept_folders = set(files), {f.split("/")[0] for f in files if "/" in f}
    # a folder left out whole by its name (checkpoint-2/), a file by its path
    left_out = sorted({path.split("/")[0] + "/" if "/" in path and path.split("/")[0] not in kept_folders else path
                       for path in every if path not in kept})
    return Upload(files, left_out, sum((folder / f).stat().st_size for f in files))


def hub_adapter_config(folder: Path) -> tuple[str, bytes] | None:
    """(the Hub id, adapter_config.json as it goes up) when the adapter's base_model_name_or_path is
    a local folder whose lineage names a Hub model (a preset, or a folder with vitune's card); None
    when the file stays as it is: no adapter, a base already on the Hub, or no Hub id known."""
    file = Path(folder) / ADAPTER_CONFIG
    if not file.is_file():
        return None
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # PEFT itself will say what is wrong with it; the file goes up as it is
    base = settings.get("base_model_name_or_path") if isinstance(settings, dict) else None
    if not isinstance(base, str) or is_hub_id(base):
        return None
    hub = lineage(base).base_model
    if not isinstance(hub, str):
        return None
    return hub, (json.dumps({**settings, "base_model_name_or_path": hub}, indent=2) + "\n").encode("utf-8")


def check_folder(folder: Path) -> None:
    """One line for a folder that cannot be pushed: missing, an unfinished run, no model in it."""
    if folder.is_file():
        raise UserError(f"{folder} is a file; give the folder it is in ({folder.parent}): its files and card go up "
                        "together")
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found (give a run folder such as runs/quickstart, a merged folder or "
                        "a folder of GGUF exports)")
    if (folder / "config.yaml").is_file() and not (folder / "summary.json").is_file():
        raise UserError(f"{folder} is an unfinished run (no summary.json): train it to the end (or resume it) first")
    if not any((folder / name).is_file() for name in ("adapter_config.json", "config.json")) and \
            not any(folder.glob("*.gguf")):
        raise UserError(f"{folder}: no model in it (no adapter_config.json, config.json or .gguf file); give a folder "
                        "written by vitune train, merge, export gguf or init-model")


def hub_endpoint() -> str:
    """The Hub pushed to: HF_ENDPOINT as set now (huggingface_hub reads it once, when imported)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def push_folder(folder: str | Path, repo: str, private: bool = False, revision: str | None = None,
                dry_run: bool = False, say=None) -> dict:
    """Upload `folder` to the model repository `repo`; returns what was done. `say(line)` hears each
    step; `dry_run`: only say what would go up (nothing written, no network)."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder, say = Path(folder), say or (lambda line: None)
    check_folder(folder)
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise UserError(f"--repo {repo!r}: not a Hub repository id ({str(exc).splitlines()[0]}); "
                        "write it as ORG/NAME") from None
    endpoint, branch = hub_endpoint(), revision or "main"
    where = f"{repo} ({branch}) at {endpoint}"
    adapter = hub_adapter_config(folder)
    if dry_run:
        upload = plan_upload(folder)
        missing = [] if (folder / CARD).is_file() else [CARD]  # the card push would write first
        _say_upload(say, Upload(sorted(upload.files + missing), upload.left_out, upload.bytes), folder, where, True)
        _say_adapter(say, adapter, folder)
        return {"repo": repo, "files": sorted(upload.files + missing), "url": None}
    token = get_token()
    if not token:
        raise UserError(f"no Hugging Face token to push with: log in with `hf auth login`, or set HF_TOKEN to a write "
                        f"token from {endpoint}/settings/tokens")
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(endpoint, repo):
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if branch != "main":
            api.create_branch(repo, branch=branch, exist_ok=True)
    card = refresh_card(folder, repo)
    say(f"model card: {'written, naming ' + repo if card else 'kept as it is (' + CARD + ')'}")
    upload = plan_upload(folder)
    _say_upload(say, upload, folder, where, False)
    _say_adapter(say, adapter, folder)
    rewritten = {ADAPTER_CONFIG: adapter[1]} if adapter else {}
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=rewritten.get(name) or str(folder / name))
                  for name in upload.files]
    with hub_errors(endpoint, repo):
        commit = api.create_commit(repo, operations, revision=branch, commit_message=f"vitune push {folder.name}")
    return {"repo": repo, "files": upload.files, "url": getattr(commit, "commit_url", None) or f"{endpoint}/{repo}"}


def _say_upload(say, upload: Upload, folder: Path, where: str, dry_run: bool) -> None:
    say(f"{'would upload' if dry_run else 'uploading'} {len(upload.files)} files ({upload.bytes / 2**20:.1f} MiB) "
        f"of {folder} to {where}:")
    for name in upload.files:
        say(f"  {name}")
    if upload.left_out:
        say(f"left out: {', '.join(upload.left_out)}")


def _say_adapter(say, adapter: tuple[str, bytes] | None, folder: Path) -> None:
    if adapter:
        local = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
        say(f"{ADAPTER_CONFIG} goes up naming its base {adapter[0]} (here {local}, a local copy; the file here "
            "is not changed)")


@contextmanager
def hub_errors(endpoint: str, repo: str):
    """What the Hub (or the way to it) answers, as one line naming the endpoint and what to do."""
    try:
        yield
    except Exception as exc:
        line = _hub_error_line(exc, endpoint, repo)
        if line is None:
            raise  # anything else is a bug of ours: its traceback
        raise UserError(line) from None


def _hub_error_line(exc: Exception, endpoint: str, repo: str) -> str | None:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push"
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        if status == 401:
            return (f"the Hub at {endpoint} refused the token (401 Unauthorized): log in again with `hf auth login`, "
                    "or set HF_TOKEN to a valid write token")
        if status == 403:
            return (f"no permission to write to {repo} at {endpoint} (403 Forbidden): use a token with write access "
                    "to it, or a repository in your own namespace")
        return f"the Hub at {endpoint} answered {status} for {repo}: {reason}"
    # connection refused, DNS, TLS, timeouts: the transport's errors, by name along the MRO (huggingface_hub has
    # used requests, httpx and httpx2 for them: matching one transport's classes would break with the next)
    if {cls.__name__ for cls in type(exc).__mro__} & {"TransportError", "ConnectionError", "RequestError"}:
        return f"cannot reach the Hub at {endpoint}: {reason}; check your network or HF_ENDPOINT"
    return None
