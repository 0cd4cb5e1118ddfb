"""Push a succeeded job's checkpoint and model card to the Hugging Face Hub.

`push_job(job, repo_id=..., private=..., token=...)` checks everything before anything is created
on the Hub: the job succeeded and still has its artifact, the repo id's syntax, a token (given with
the request or the user's stored one), that the Hub accepts the token (`whoami`), that the token may
write and that the repo's namespace is the token's user or one of its organisations. Then it creates
the repo (an existing repo is an error, never overwritten) and uploads every file in ONE commit
(`create_commit`), which the Hub applies whole or not at all; if the commit fails, a repo this push
created is deleted again, so nothing is left half pushed. Each step is a `JobEvent` (stage "push"),
which is the progress the job page shows, ending with the link.

Tokens: never logged, never stored in an event or a result. A user may keep one token, encrypted
with a key derived from SECRET_KEY (Fernet), in ``VAR_DIR/hub-tokens/<user id>.token`` (mode 0600).
The Hub's address is ``COMPRESSOR_HF_ENDPOINT`` (tests point it at a local server).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings

from .archive import artifact_path
from .models import Job, JobEvent, Status
from .storage import local_copy, stored_object

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
TOKEN = re.compile(r"^[A-Za-z0-9_\-.]{8,400}$")


class PushError(ValueError):
    """A push that cannot happen or did not happen; `field` names what to change."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass
class PushResult:
    url: str
    commit_url: str
    files: int
    bytes: int
    private: bool


# ----------------------------------------------------------------------------- stored tokens

def _fernet():
    from cryptography.fernet import Fernet

    key = hashlib.sha256(b"compressor hub-token v1\0" + settings.SECRET_KEY.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def _token_path(user: Any) -> Path:
    return Path(settings.VAR_DIR) / "hub-tokens" / f"{int(user.pk)}.token"


def store_token(user: Any, token: str) -> None:
    """Keep ``token`` for ``user``, encrypted; written by temp file + rename, mode 0600."""
    check_token_syntax(token)
    path = _token_path(user)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(_fernet().encrypt(token.encode()))
    tmp.replace(path)


def stored_token(user: Any) -> str | None:
    from cryptography.fernet import InvalidToken

    try:
        return _fernet().decrypt(_token_path(user).read_bytes()).decode()
    except FileNotFoundError:
        return None
    except InvalidToken:  # SECRET_KEY changed: the stored token cannot be read any more
        log.warning("stored Hub token of user %s cannot be decrypted (SECRET_KEY changed?)", user.pk)
        return None


def forget_token(user: Any) -> bool:
    try:
        _token_path(user).unlink()
        return True
    except FileNotFoundError:
        return False


def has_token(user: Any) -> bool:
    return _token_path(user).is_file()


def check_token_syntax(token: Any) -> str:
    if not isinstance(token, str) or not TOKEN.match(token.strip()):
        raise PushError("token", "must be a Hugging Face access token (hf_..., letters, digits, - _ .)")
    return token.strip()


# ----------------------------------------------------------------------------- checks

def check_request(job: Job, *, repo_id: Any, private: Any, token: Any, owner: Any) -> tuple[str, bool, str, Path | None]:
    """(repo id, private, token, local artifact dir or None when it is in the bucket) or PushError naming the field; nothing touches the Hub."""
    if job.status != Status.SUCCEEDED:
        raise PushError("job", f"only a succeeded job can be pushed; this one is {job.status}", 409)
    artifact = artifact_path(job)
    if artifact is None and stored_object(job) is None:
        raise PushError("job", "this job's artifact is no longer on the server", 409)
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id.strip()):
        raise PushError("repo_id", "must be a Hub model id like your-name/model-name (letters, digits, - _ .; "
                                   "at most 96 characters each side)")
    if private is None:
        private = True
    if not isinstance(private, bool):
        raise PushError("private", "must be true or false")
    if token in (None, ""):
        token = stored_token(owner)
        if token is None:
            raise PushError("token", "no token given and none stored; give a Hugging Face access token with write "
                                     "access (it is used for this push only unless you ask to remember it)")
    token = check_token_syntax(token)
    from compression.data_sources import offline_reason

    if offline_reason():
        raise PushError("hub", f"the Hugging Face Hub is switched off on this server ({offline_reason()})", 503)
    return repo_id.strip(), private, token, artifact


# ----------------------------------------------------------------------------- push

def _event(job: Job, message: str, level: str = "info", **data: Any) -> None:
    JobEvent.objects.create(job=job, stage="push", level=level, message=message[:2000], data=data)


def _status_of(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _network_error(exc: BaseException) -> bool:
    """A connection/timeout failure anywhere in the chain (huggingface_hub's HTTP client is httpx or
    its fork httpx2, so the transport errors are recognised by class name)."""
    seen: BaseException | None = exc
    while seen is not None:
        names = {cls.__name__ for cls in type(seen).__mro__}
        if isinstance(seen, (ConnectionError, TimeoutError)) or names & {"TransportError", "ConnectError",
                                                                          "TimeoutException", "NetworkError"}:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _files(artifact: Path) -> list[Path]:
    return sorted(p for p in artifact.rglob("*") if p.is_file() and not p.is_symlink())


def push_job(job: Job, *, repo_id: Any, private: Any = True, token: Any = None, remember_token: bool = False,
             owner: Any) -> PushResult:
    """Push ``job``'s artifact (checkpoint + README.md model card) to ``repo_id`` in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id, private, token, artifact = check_request(job, repo_id=repo_id, private=private, token=token,
                                                      owner=owner)
    endpoint = settings.COMPRESSOR_HF_ENDPOINT.rstrip("/")
    api = HfApi(endpoint=endpoint, token=token, library_name="compressor")
    created = False
    try:
        _event(job, f"push to {repo_id}: checking the token with the Hub")
        try:
            who = api.whoami(token=token)
        except HfHubHTTPError as exc:
            if _status_of(exc) in (401, 403):
                raise PushError("token", "the Hugging Face Hub rejected this token (invalid or expired)") from None
            raise
        namespace = repo_id.split("/")[0]
        role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
        writable = [who.get("name")] + [o.get("name") for o in who.get("orgs") or [] if isinstance(o, dict)]
        if role == "read":
            raise PushError("token", "this token is read-only; create one with write access")
        if namespace not in writable:
            raise PushError("repo_id", f"this token cannot write to {namespace!r}; it belongs to {who.get('name')!r}"
                                       + (f" (organisations: {', '.join(map(str, writable[1:]))})"
                                          if writable[1:] else ""))
        if remember_token:
            store_token(owner, token)
        _event(job, f"creating the {'private' if private else 'public'} model repo {repo_id}")
        try:
            url = str(api.create_repo(repo_id, private=private, repo_type="model", exist_ok=False))
        except HfHubHTTPError as exc:
            if _status_of(exc) == 409:
                raise PushError("repo_id", f"{repo_id} already exists on the Hub; choose a new name (an existing "
                                           "repo is never overwritten)") from None
            if _status_of(exc) in (401, 403):
                raise PushError("repo_id", f"this token may not create repos in {namespace!r}") from None
            raise
        created = True
        with local_copy(job) as artifact:  # the bucket's tar, extracted to a temporary directory
            if artifact is None:
                raise PushError("job", "this job's artifact is no longer in the artifact store", 409)
            files = _files(artifact)
            total = sum(p.stat().st_size for p in files)
            _event(job, f"uploading {len(files)} files ({total / 1e6:.1f} MB) in one commit", files=len(files),
                   bytes=total)
            operations = [CommitOperationAdd(path_in_repo=p.relative_to(artifact).as_posix(),
                                             path_or_fileobj=str(p)) for p in files]
            commit = api.create_commit(repo_id, operations=operations, repo_type="model",
                                       commit_message=f"Compressor job {job.id}: {job.recipe_name}")
    except PushError as exc:
        _cleanup(api, repo_id, created, job)
        _event(job, f"push to {repo_id} failed: {exc.message}", level="error")
        raise
    except Exception as exc:  # network, Hub errors: the repo this push created is removed again
        _cleanup(api, repo_id, created, job)
        if _network_error(exc):
            message = f"could not reach the Hugging Face Hub at {endpoint} ({type(exc).__name__})"
            error = PushError("hub", message, 502)
        else:
            error = PushError("hub", f"the Hub refused the push: {_safe(exc, token)}", 502)
        _event(job, f"push to {repo_id} failed: {error.message}", level="error")
        raise error from None
    _event(job, f"pushed to {url}", url=url, commit_url=commit.commit_url, repo_id=repo_id, private=private)
    log.info("job %s pushed to %s", job.id, repo_id)
    return PushResult(url=url, commit_url=commit.commit_url, files=len(files), bytes=total, private=private)


def _safe(exc: Exception, token: str) -> str:
    return str(exc).replace(token, "***")[:500]


def _cleanup(api: Any, repo_id: str, created: bool, job: Job) -> None:
    if not created:
        return
    try:
        api.delete_repo(repo_id, repo_type="model", missing_ok=True)
        _event(job, f"removed the repo {repo_id} this push had created", level="warning")
    except Exception as exc:  # noqa: BLE001 - reported, the original error is what the user needs
        _event(job, f"could not remove the empty repo {repo_id} after the failed push: {type(exc).__name__}",
               level="warning")


def last_push(job: Job) -> dict | None:
    """The data of the job's last successful push event ({"url", "repo_id", ...}) or None."""
    for event in job.events.filter(stage="push").order_by("-id")[:20]:
        if isinstance(event.data, dict) and event.data.get("url"):
            return event.data
    return None
