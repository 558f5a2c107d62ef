"""Local paths and object-storage URIs (s3://, gs://, abfs://, hdfs://, ...) behind one small set of
functions, on pyarrow.fs. Plain Python and pyarrow, never Ray: the driver checks a URI with it
before any cluster work, and the filesystem objects it returns travel to Ray Data tasks and to Ray
Train's RunConfig(storage_filesystem=...).

s3:// follows the AWS conventions: credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN (or ~/.aws, or an instance role), AWS_REGION / AWS_DEFAULT_REGION, and an
S3-compatible server (MinIO, Ceph, moto) from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import parse_qsl, unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

# A wrong endpoint must fail in seconds, whatever the AWS SDK's defaults of the pyarrow installed:
# at most 2 attempts of a 2 s connect (measured with pyarrow 26: a closed port fails in 0.4 s, a
# host that does not resolve in 1 s; an address that drops packets takes the full 2 x 2 s).
# request_timeout is a socket read timeout, which pyarrow applies on Windows and macOS only: a
# stall without a byte, not a limit on a transfer, so it may be longer than the connect's.
S3_CONNECT_TIMEOUT_S = 2.0
S3_REQUEST_TIMEOUT_S = 10.0
S3_MAX_ATTEMPTS = 2

# Environment variables that change which S3 filesystem a URI resolves to (the cache key).
_S3_ENV = (
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_REGION",
    "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
)  # fmt: skip
# Options an s3:// URI may carry in its query (a subset of those FileSystem.from_uri reads).
_S3_QUERY_OPTIONS = {"region", "scheme", "endpoint_override", "access_key", "secret_key", "session_token", "anonymous"}
# Schemes that are always object storage: "s3:/x" (one slash) is a typo for one of them, not a local
# file named "s3:", and must fail loudly rather than write into a folder called "s3:".
_REMOTE_SCHEMES = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs"}
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")  # 2+ letters: "C:\..." is a Windows path
_SCHEME_TYPO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(?!//)")
# user:password@, up to the last "@" before the path (a password may hold an "@")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*:[^/?#]*)@")
_ANY_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*:[^/?#\s]*@")
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_QUERY_PARAM = re.compile(r"(^|[?&])([^=&#\s]+)=([^&#\s]*)")
_SECRET_PARAM = re.compile(r"secret|token|password|passwd|pwd|sig|credential|key", re.IGNORECASE)

# pyarrow's S3 errors read "AWS Error <CODE> during <Operation> operation: <message>"; the codes of
# the AWS SDK for C++, and the S3 error names for servers whose codes the SDK does not know.
_NO_BUCKET = re.compile(r"NO_SUCH_BUCKET|NoSuchBucket")
_DENIED = re.compile(
    r"ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|INVALID_CLIENT_TOKEN_ID|EXPIRED_TOKEN|"
    r"REQUEST_EXPIRED|MISSING_AUTHENTICATION_TOKEN|UNRECOGNIZED_CLIENT|AccessDenied|InvalidAccessKeyId|"
    r"SignatureDoesNotMatch|InvalidToken|ExpiredToken|HTTP status 403|Forbidden"
)
_UNREACHABLE = re.compile(
    r"NETWORK_CONNECTION|REQUEST_TIMEOUT|curlCode|Could not connect|Could not resolve|Failed to connect|"
    r"Connection refused|Timeout was reached|timed out",
    re.IGNORECASE,
)


class StorageError(ValueError):
    """A path or URI that cannot be used; the message is one line naming it, credentials redacted."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for object storage (`scheme://...` other than file://, or a misspelt `s3:/...`); plain
    paths and file:// URIs are local."""
    text = os.fspath(path)
    if not isinstance(text, str):
        return False
    match = _URI.match(text) or _SCHEME_TYPO.match(text)
    if not match:
        return False
    scheme = match.group(1).lower()
    return scheme != "file" and (match.re is _URI or scheme in _REMOTE_SCHEMES)


def redact(uri: str | os.PathLike) -> str:
    """`uri` with a `user:password@` in it and every secret-looking query parameter (access_key,
    secret_key, token, sig, ...) replaced by ***: the form to print or write anywhere."""
    text = os.fspath(uri)
    if not isinstance(text, str) or not _URI.match(text):
        return text
    text = _USERINFO.sub(r"\1***@", text)
    head, sep, query = text.partition("?")
    if not sep:
        return text
    query, hash_, fragment = query.partition("#")

    def hide(m: re.Match) -> str:
        return f"{m.group(1)}{m.group(2)}=***" if _SECRET_PARAM.search(m.group(2)) else m.group(0)

    return head + sep + _QUERY_PARAM.sub(hide, query) + hash_ + fragment


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base`/part/...: os.path.join for local paths; for a URI, parts go before its query
    ("s3://b/x" + "y" -> "s3://b/x/y")."""
    base = os.fspath(base)
    if not is_uri(base):
        return os.path.join(base, *parts)
    head, sep, query = base.partition("?")
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not tail:
        return base
    if "://" not in head:  # "s3:/x": is_uri calls it a URI, so that it is refused rather than used as a folder
        raise StorageError(f"{redact(base)} is not a valid URI: write scheme://bucket/path")
    scheme_end = head.index("://") + 3
    joined = head if head.endswith("/") and len(head) > scheme_end else head + "/"
    return joined + tail + sep + query


def resolve(path_or_uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it). Local paths and file:// -> LocalFileSystem and the absolute
    path; s3:// -> an S3FileSystem set from the AWS environment (see the module docstring); other
    URIs -> pyarrow's FileSystem.from_uri. The filesystem pickles (secrets from the environment
    stay out of it: each process that unpickles it reads its own)."""
    text = os.fspath(path_or_uri)
    if not is_uri(text):
        if text.lower().startswith("file:"):
            return pafs.LocalFileSystem(), _file_uri_path(text)
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
    if not _URI.match(text):
        scheme = _SCHEME_TYPO.match(text).group(1)
        raise StorageError(f"{redact(text)} is not a valid URI: write {scheme}://bucket/path")
    try:
        parts = urlsplit(text)
    except ValueError as e:  # an unbalanced "[" in the host, say
        raise StorageError(f"{redact(text)} is not a valid URI ({e})") from None
    scheme = parts.scheme.lower()
    if scheme == "s3":
        return _resolve_s3(text, parts)
    try:
        return pafs.FileSystem.from_uri(text)
    except (OSError, pa.ArrowException) as e:
        message = _scrub(str(e), text)
        if "Unrecognized filesystem type" in message:
            raise StorageError(
                f"{redact(text)}: unknown storage scheme {scheme!r} (pyarrow reads s3://, gs://, abfs://, hdfs://)"
            ) from None
        raise StorageError(f"{redact(text)}: cannot open this storage ({message})") from None


def exists(uri: str | os.PathLike) -> bool:
    """Whether a file or folder (for object storage: an object, a prefix or a bucket) is there."""
    return _info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str | os.PathLike) -> bool:
    """Whether `uri` is a folder (a prefix with objects under it, or a bucket)."""
    return _info(uri).type == pafs.FileType.Directory


def is_file(uri: str | os.PathLike) -> bool:
    """Whether `uri` is a file (an object)."""
    return _info(uri).type == pafs.FileType.File


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = resolve(uri)
    with _errors(uri, fs):
        with fs.open_input_stream(path) as f:
            return f.read()


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `uri`: locally through a temporary file and a rename (parents created), so
    that a reader never sees half a file; to object storage as one put, which is atomic there."""
    fs, path = resolve(uri)
    with _errors(uri, fs):
        if isinstance(fs, pafs.LocalFileSystem):
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            # one temporary name per process and thread: two writers never write into the same one
            tmp = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)


def write_text(uri: str | os.PathLike, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str | os.PathLike, suffixes: str | Iterable[str] | None = None, recursive: bool = True) -> list[str]:
    """Sorted files under the folder `uri` whose names end with one of `suffixes` (any case), in the
    style of `uri`: a URI gives URIs (scheme and bucket included), a local path absolute paths."""
    text = os.fspath(uri)
    fs, path = resolve(text)
    if isinstance(suffixes, str):
        suffixes = [suffixes]
    ends = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    with _errors(text, fs, listing=True):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    if is_uri(text):
        head, sep, query = text.partition("?")
        # each listed path is `path` + rest; a listed URI keeps what the folder's has before `path`
        # (scheme, bucket or host) and its query, so that it resolves the same way
        prefix, base, suffix = head.rstrip("/"), path.rstrip("/"), sep + query
    else:
        prefix, base, suffix = ("file://" if text.lower().startswith("file:") else ""), "", ""
    files = [
        prefix + info.path[len(base) :] + suffix
        for info in infos
        if info.type == pafs.FileType.File and (ends is None or info.base_name.lower().endswith(ends))
    ]
    return sorted(files)


def download(uri: str | os.PathLike, local_dir: str | os.PathLike) -> Path:
    """Copy the file or folder tree at `uri` into the local folder `local_dir`, as
    local_dir/<its name>; returns that path."""
    fs, path = resolve(uri)
    with _errors(uri, fs):
        info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{redact(os.fspath(uri))} does not exist")
    name = path.rstrip("/").rsplit("/", 1)[-1]
    target = Path(local_dir).expanduser().resolve() / name
    target.parent.mkdir(parents=True, exist_ok=True)  # copy_files does not create a file's parents
    with _errors(uri, fs):
        pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


def upload(local_path: str | os.PathLike, uri: str | os.PathLike) -> str:
    """Copy a local file to `uri`, or a local folder's tree under the folder `uri`; returns `uri`."""
    source = Path(local_path).expanduser().resolve()
    if not source.exists():
        raise StorageError(f"{source} does not exist")
    fs, path = resolve(uri)
    with _errors(uri, fs):
        if isinstance(fs, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(str(source), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return os.fspath(uri)


def check(uri: str | os.PathLike, must_exist: bool = True, what: str = "data") -> None:
    """Probe `uri` before any cluster work: StorageError with one line saying what is wrong (a bad
    URI, a missing bucket, credentials refused, an endpoint that does not answer, nothing at `uri`
    when `must_exist`). `what` names the URI's role in the message ("data", "storage path")."""
    text = os.fspath(uri)
    try:
        fs, path = resolve(text)
    except StorageError as e:
        raise StorageError(f"{what} {e}") from None
    if isinstance(fs, pafs.S3FileSystem):
        bucket = path.split("/", 1)[0]
        with _errors(text, fs, what=what):
            found = fs.get_file_info(bucket).type != pafs.FileType.NotFound  # HeadBucket: also checks the keys
        if not found:
            raise StorageError(f"{what} {redact(text)}: bucket {bucket!r} does not exist")
        if path == bucket:
            return
    with _errors(text, fs, what=what):
        info = fs.get_file_info(path)
    if must_exist and info.type == pafs.FileType.NotFound:
        raise StorageError(f"{what} {redact(text)} does not exist")


def _info(uri: str | os.PathLike) -> pafs.FileInfo:
    fs, path = resolve(uri)
    with _errors(uri, fs):
        return fs.get_file_info(path)


def _file_uri_path(text: str) -> str:
    """file:///abs/path or file:/abs/path -> /abs/path (percent-escapes decoded, as pyarrow does)."""
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost"):
        raise StorageError(f"{redact(text)}: a file:// URI names this machine's files, not host {parts.netloc!r}")
    return os.path.abspath(unquote(parts.path) or "/")


def _resolve_s3(text: str, parts) -> tuple[pafs.FileSystem, str]:
    bucket = parts.netloc.rsplit("@", 1)[-1]
    if not bucket:
        raise StorageError(f"{redact(text)} is not a valid URI: it names no bucket (write s3://bucket/path)")
    if not _BUCKET.match(bucket):
        raise StorageError(f"{redact(text)}: {bucket!r} is not a valid bucket name")
    query = tuple(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted({k for k, _ in query} - _S3_QUERY_OPTIONS)
    if unknown:
        raise StorageError(f"{redact(text)}: unknown option {unknown[0]!r} (known: {', '.join(sorted(_S3_QUERY_OPTIONS))})")
    userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    env = tuple(os.environ.get(k) for k in _S3_ENV)
    try:
        fs = _s3_filesystem(bucket, userinfo, query, env)
    except (ValueError, OSError, pa.ArrowException) as e:  # a secret_key without its access_key, say
        raise StorageError(f"{redact(text)}: {_scrub(str(e), text)}") from None
    key = parts.path.strip("/")
    return fs, f"{bucket}/{key}" if key else bucket


def _s3_endpoint(query: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(endpoint URL or None for AWS itself, where it came from), as resolve() uses it."""
    if query and query.get("endpoint_override"):
        return query["endpoint_override"], "the URI's endpoint_override"
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() != "true":
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):  # the AWS SDKs' order
            if os.environ.get(name):
                return os.environ[name], name
    return None, ""


@functools.lru_cache(maxsize=64)
def _s3_filesystem(bucket: str, userinfo: str, query: tuple, env: tuple) -> pafs.S3FileSystem:
    """One S3FileSystem per bucket, URI options and AWS environment (`env` is only the cache key).

    Built here rather than by FileSystem.from_uri, which takes no timeouts or retry strategy. The
    endpoint is passed explicitly: from_uri reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (pyarrow 17
    and 26 checked), but the S3FileSystem constructor does not."""
    options = dict(query)
    endpoint, _ = _s3_endpoint(options)
    kwargs = {
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
        # not pickled by pyarrow: an unpickled copy retries with pyarrow's default (3 attempts)
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    }
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = endpoint.split("://", 1)[0].lower() if "://" in endpoint else "https"
    if options.get("scheme"):
        kwargs["scheme"] = options["scheme"]
    region = options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and endpoint:
        region = "us-east-1"  # what MinIO and Ceph expect unless configured otherwise
    if not region:
        # AWS itself: the bucket's region, as FileSystem.from_uri finds it (one HEAD request);
        # if that fails, the SDK's default, and check() reports the real error
        try:
            region = pafs.resolve_s3_region(bucket)
        except (OSError, pa.ArrowException):
            region = None
    if region:
        kwargs["region"] = region
    if ":" in userinfo:
        kwargs["access_key"], kwargs["secret_key"] = (unquote(s) for s in userinfo.split(":", 1))
    for name in ("access_key", "secret_key", "session_token"):
        if options.get(name):
            kwargs[name] = options[name]
    if options.get("anonymous", "").lower() in ("1", "true", "yes"):
        kwargs["anonymous"] = True
    try:
        # one PUT for a small object instead of a three-request multipart upload (pyarrow >= 21)
        return pafs.S3FileSystem(**kwargs, allow_delayed_open=True)
    except TypeError:
        return pafs.S3FileSystem(**kwargs)


@contextlib.contextmanager
def _errors(uri: str | os.PathLike, fs: pafs.FileSystem, what: str = "", listing: bool = False) -> Iterator[None]:
    """Turn pyarrow's OSError / ArrowException inside the block into one StorageError line."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise StorageError(_message(os.fspath(uri), fs, e, what, listing)) from None


def _message(uri: str, fs: pafs.FileSystem, error: BaseException, what: str, listing: bool) -> str:
    shown = f"{what} {redact(uri)}" if what else redact(uri)
    text = _scrub(str(error), uri)
    if isinstance(fs, pafs.S3FileSystem):
        bucket = urlsplit(uri).netloc.rsplit("@", 1)[-1]
        if _NO_BUCKET.search(text):
            return f"{shown}: bucket {bucket!r} does not exist"
        if _DENIED.search(text):  # a wrong key id, a wrong secret, or a key without the permission
            return (
                f"{shown}: access denied; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
                f"AWS_SESSION_TOKEN if set) and that they may use bucket {bucket!r}"
            )
        if _UNREACHABLE.search(text):
            endpoint, source = _s3_endpoint(dict(parse_qsl(urlsplit(uri).query)))
            where = f"the S3 endpoint {redact(endpoint)} (from {source})" if endpoint else "AWS S3"
            return f"{shown}: cannot reach {where}; check the address and the network ({_reason(text)})"
    elif _UNREACHABLE.search(text):
        return f"{shown}: cannot reach the storage server ({_reason(text)})"
    if isinstance(error, FileNotFoundError):
        if listing and _is_file(fs, uri):  # S3 lists the prefix "key/" under a file and finds nothing
            return f"{shown} is a file, not a folder"
        return f"{shown} does not exist"
    if isinstance(error, NotADirectoryError):
        return f"{shown} is a file, not a folder"
    if isinstance(error, PermissionError):
        return f"{shown}: permission denied"
    return f"{shown}: {text}"


def _is_file(fs: pafs.FileSystem, uri: str) -> bool:
    try:
        return fs.get_file_info(resolve(uri)[1]).type == pafs.FileType.File
    except (OSError, pa.ArrowException, StorageError):
        return False


def _reason(text: str) -> str:
    """The SDK's own words after "Details:" (or its message), without the request id."""
    detail = text.split("Details:", 1)[-1] if "Details:" in text else text.split("operation:", 1)[-1]
    return re.sub(r"\s*\(Request ID: [^)]*\)", "", detail).strip()


def _scrub(text: str, uri: str) -> str:
    """The first line of an error message, with the URI redacted (pyarrow repeats URIs verbatim)
    and no credential from the environment in it."""
    line = text.strip().splitlines()[0] if text.strip() else text
    line = line.replace(uri, redact(uri))
    line = _ANY_USERINFO.sub(r"\1***@", line)
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            line = line.replace(secret, "***")
    return line
