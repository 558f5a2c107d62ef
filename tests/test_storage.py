"""unet_ray.storage against local folders and a real S3 API (moto's server, tests/conftest.py's
s3_server): round trips, the URI style of listings, redaction, pickled filesystems, and the one-line
errors of `check` for each way an object-storage URI goes wrong."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest
from helpers import free_port

from unet_ray import storage
from unet_ray.storage import StorageError

# moto's server starts in the first S3 test's setup (a few seconds; the fixture waits at most 60)
pytestmark = pytest.mark.timeout(120)

TREE = {"a.PNG": b"png-a", "b.txt": b"text-b", "sub/c.png": b"png-c", "sub/deeper/d.jpg": b"jpg-d"}


def write_tree(root, tree=TREE):
    for name, data in tree.items():
        storage.write_bytes(storage.join(root, name), data)


def read_tree(root) -> dict[str, bytes]:
    root = str(root)
    return {path[len(root) + 1 :].replace(os.sep, "/"): storage.read_bytes(path) for path in storage.list_files(root)}


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(StorageError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_is_uri_and_join():
    assert storage.is_uri("s3://b/k") and storage.is_uri("gs://b") and storage.is_uri("hdfs://h:8020/x")
    assert storage.is_uri("s3:/b/k")  # a typo goes to the URI side, where it fails loudly
    for local in ("/data/x", "data/x", "file:///data/x", r"C:\data", "~/x"):
        assert not storage.is_uri(local), local
    assert storage.join("s3://b/x", "y", "z.png") == "s3://b/x/y/z.png"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("s3://b/x/", "/y/") == "s3://b/x/y"
    assert storage.join("s3://b/x?region=eu-west-1", "y") == "s3://b/x/y?region=eu-west-1"
    assert storage.join("/data", "y", "z") == os.path.join("/data", "y", "z")


def test_redact_hides_userinfo_and_secret_query_parameters():
    assert storage.redact("s3://AKIAX:s3cr3t@bucket/k") == "s3://***@bucket/k"
    assert storage.redact("s3://AKIAX:p@ss:w0rd@bucket/k@v1") == "s3://***@bucket/k@v1"
    assert storage.redact("hdfs://alice@namenode:8020/x") == "hdfs://alice@namenode:8020/x"  # a user name alone
    assert storage.redact("abfs://container@acct.dfs.core.windows.net/p") == "abfs://container@acct.dfs.core.windows.net/p"
    uri = "s3://b/k?region=eu-west-1&access_key=AKIAX&secret_key=s3cr3t&session_token=tok&endpoint_override=h:9000"
    shown = storage.redact(uri)
    assert shown == "s3://b/k?region=eu-west-1&access_key=***&secret_key=***&session_token=***&endpoint_override=h:9000"
    shown = storage.redact("abfs://c@acct.dfs.core.windows.net/p?sv=2022&sig=abc%2Fdef&password=pw")
    assert "abc" not in shown and "pw" not in shown.split("?")[1] and "sv=2022" in shown
    assert storage.redact("/local/path?x") == "/local/path?x"


def test_local_round_trip_listing_and_copies(tmp_path):
    root = tmp_path / "root"
    write_tree(root)  # parents created
    assert storage.read_text(root / "b.txt") == "text-b"
    assert storage.exists(root / "sub") and storage.is_dir(root / "sub") and not storage.is_file(root / "sub")
    assert storage.is_file(root / "a.PNG") and not storage.exists(root / "nope")
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]  # no temporary file left over

    assert storage.list_files(root) == sorted(str(root / n) for n in TREE)
    assert storage.list_files(str(root), suffixes=".png") == [str(root / "a.PNG"), str(root / "sub/c.png")]
    assert storage.list_files(root, suffixes=[".jpg", ".TXT"], recursive=False) == [str(root / "b.txt")]
    assert storage.list_files(f"file://{root}", suffixes="jpg") == [f"file://{root}/sub/deeper/d.jpg"]

    copy = storage.download(root, tmp_path / "down")
    assert copy == tmp_path / "down" / "root" and read_tree(copy) == TREE
    storage.upload(root / "sub", tmp_path / "up" / "nested")
    assert read_tree(tmp_path / "up" / "nested") == {"c.png": b"png-c", "deeper/d.jpg": b"jpg-d"}

    assert "is a file, not a folder" in one_line_error(storage.list_files, root / "b.txt")
    assert "does not exist" in one_line_error(storage.read_bytes, root / "nope")
    storage.check(root)
    storage.check(tmp_path / "later", must_exist=False)
    assert one_line_error(storage.check, tmp_path / "later", what="data") == f"data {tmp_path / 'later'} does not exist"


def test_local_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "meta.json"
    storage.write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    assert "No space left" in one_line_error(storage.write_text, target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_s3_round_trip_listing_and_copies(s3_env, tmp_path):
    bucket = s3_env.make_bucket("round-trip")
    root = storage.join(bucket, "data")
    write_tree(root)
    assert storage.read_text(f"{root}/b.txt") == "text-b"
    assert storage.is_dir(bucket) and storage.is_dir(root) and storage.is_dir(f"{root}/sub")
    assert storage.is_file(f"{root}/sub/c.png") and not storage.exists(f"{root}/nope")
    assert not storage.exists("s3://no-such-bucket/x")

    assert storage.list_files(root) == sorted(f"s3://round-trip/data/{n}" for n in TREE)
    assert storage.list_files(bucket + "/", suffixes=".png") == ["s3://round-trip/data/a.PNG", "s3://round-trip/data/sub/c.png"]
    assert storage.list_files(root, recursive=False) == ["s3://round-trip/data/a.PNG", "s3://round-trip/data/b.txt"]

    local = storage.download(f"{root}/sub", tmp_path / "down")
    assert local == tmp_path / "down" / "sub"
    assert read_tree(local) == {"c.png": b"png-c", "deeper/d.jpg": b"jpg-d"}
    assert storage.download(f"{root}/a.PNG", tmp_path / "one").read_bytes() == b"png-a"

    storage.upload(local, f"{bucket}/copy")
    assert read_tree(f"{bucket}/copy") == {"c.png": b"png-c", "deeper/d.jpg": b"jpg-d"}
    storage.upload(local / "c.png", f"{bucket}/single.png")
    assert storage.read_bytes(f"{bucket}/single.png") == b"png-c"
    storage.write_bytes(f"{bucket}/single.png", b"")  # overwrite, with an empty object
    assert storage.read_bytes(f"{bucket}/single.png") == b"" and storage.is_file(f"{bucket}/single.png")


def test_a_small_s3_write_is_one_put(s3_env):
    """Not a three-request multipart upload (pyarrow >= 21, allow_delayed_open)."""
    if "allow_delayed_open" not in (pafs.S3FileSystem.__doc__ or ""):
        pytest.skip("this pyarrow opens a multipart upload for every write")
    s3_env.make_bucket("single-put")
    storage.write_text("s3://single-put/meta.json", "{}")
    deadline = time.monotonic() + 10
    while '"PUT /single-put/meta.json HTTP' not in s3_env.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)  # the server logs each request after answering it
    log = s3_env.log.read_text()
    assert '"PUT /single-put/meta.json HTTP' in log and "/single-put/meta.json?uploads" not in log, log[-2000:]


def test_the_s3_endpoint_comes_from_the_aws_variables(s3_env, monkeypatch):
    s3_env.make_bucket("endpoint")
    storage.write_text("s3://endpoint/x.txt", "x")
    fs, path = storage.resolve("s3://endpoint/x.txt")
    assert isinstance(fs, pafs.S3FileSystem) and path == "endpoint/x.txt"
    # AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL, as in the AWS SDKs
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint)
    assert storage.read_text("s3://endpoint/x.txt") == "x"
    # and the URI's own endpoint_override wins over both
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    assert storage.read_text(f"s3://endpoint/x.txt?endpoint_override={s3_env.endpoint}") == "x"


def test_the_s3_filesystem_pickles_without_the_secret(s3_env, tmp_path):
    s3_env.make_bucket("pickled")
    storage.write_bytes("s3://pickled/k.bin", b"payload")
    fs, path = storage.resolve("s3://pickled/k.bin")
    data = pickle.dumps(fs)
    assert s3_env.env["AWS_SECRET_ACCESS_KEY"].encode() not in data
    assert pickle.loads(data).open_input_stream(path).read() == b"payload"
    # in another process (a Ray worker's situation), with the credentials in its own environment
    (tmp_path / "fs.pkl").write_bytes(data)
    # pyarrow.fs registers the S3 finalizer at exit; unpickling alone imports only pyarrow._s3fs,
    # and such a process segfaults at exit (a Ray worker has imported pyarrow.fs long before)
    code = "import pickle, sys, pyarrow.fs; fs = pickle.load(open(sys.argv[1], 'rb')); print(fs.open_input_stream(sys.argv[2]).read().decode())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_env.env
    env.pop("AWS_ENDPOINT_URL")  # the endpoint travels in the pickle
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fs.pkl"), path], env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "payload", done.stderr[-2000:]


def test_check_missing_bucket_and_missing_object(s3_env):
    secret = s3_env.env["AWS_SECRET_ACCESS_KEY"]
    message = one_line_error(storage.check, "s3://no-such-bucket/data", what="data")
    assert message == "data s3://no-such-bucket/data: bucket 'no-such-bucket' does not exist"
    message = one_line_error(storage.list_files, "s3://no-such-bucket/data")
    assert "bucket 'no-such-bucket' does not exist" in message
    message = one_line_error(storage.check, "s3://AKIAUSER:hunter2-secret@no-such-bucket/k")
    assert "s3://***@no-such-bucket/k" in message and "hunter2" not in message

    bucket = s3_env.make_bucket("checked")
    storage.write_text(f"{bucket}/data/x.txt", "x")
    storage.check(bucket)
    storage.check(f"{bucket}/data")  # a prefix
    storage.check(f"{bucket}/data/x.txt")
    storage.check(f"{bucket}/runs/new", must_exist=False)
    message = one_line_error(storage.check, f"{bucket}/runs/new", what="storage path")
    assert message == "storage path s3://checked/runs/new does not exist" and secret not in message
    assert one_line_error(storage.read_bytes, f"{bucket}/nope") == "s3://checked/nope does not exist"
    assert one_line_error(storage.list_files, f"{bucket}/data/x.txt") == "s3://checked/data/x.txt is a file, not a folder"


def test_check_refuses_wrong_keys(s3_env, monkeypatch):
    bucket = s3_env.make_bucket("guarded")
    storage.write_text(f"{bucket}/x.txt", "x")
    with s3_env.enforce_auth() as (key_id, secret):
        # the server's own user: its key works
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        storage.check(f"{bucket}/x.txt")
        assert storage.read_text(f"{bucket}/x.txt") == "x"
        # its key id with a wrong secret (SignatureDoesNotMatch), and a key id the server does not
        # know (InvalidAccessKeyId): both are "access denied", naming the variables, not their values
        for key, wrong in ((key_id, "wrong-secret-Xy7"), ("testing-key", s3_env.env["AWS_SECRET_ACCESS_KEY"])):
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
            for call in (storage.check, storage.read_bytes, storage.list_files):
                target = bucket if call is storage.list_files else f"{bucket}/x.txt"
                message = one_line_error(call, target)
                assert f"{target}: access denied; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message, message
                assert wrong not in message and secret not in message and key not in message
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.env["AWS_SECRET_ACCESS_KEY"])
    storage.check(f"{bucket}/x.txt")  # auth is off again for the other tests


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3:/x", "data s3:/x is not a valid URI: write s3://bucket/path"),
        ("s3:bucket/x", "data s3:bucket/x is not a valid URI: write s3://bucket/path"),
        ("s3:///x", "data s3:///x is not a valid URI: it names no bucket (write s3://bucket/path)"),
        ("s3://bad:bucket/x", "data s3://bad:bucket/x: 'bad:bucket' is not a valid bucket name"),
        ("s3://b/k?bogus=1", "data s3://b/k?bogus=1: unknown option 'bogus'"),
        ("s3://b/k?secret_key=hunter2", "data s3://b/k?secret_key=***: In order to initialize with explicit credentials"),
        ("nosuch://b/k", "data nosuch://b/k: unknown storage scheme 'nosuch'"),
        ("nosuch://user:hunter2@b/k", "data nosuch://***@b/k: unknown storage scheme 'nosuch'"),
        # pyarrow's own refusal (not a FileSystem.from_uri option), its first line
        ("gs://b/k?access_token=hunter2&bogus=1", "data gs://b/k?access_token=***&bogus=1: cannot open this storage (Unexpected query parameter"),
    ],
)
def test_bad_uris_fail_in_one_line(s3_env, uri, expected):
    message = one_line_error(storage.check, uri)
    assert message.startswith(expected), message
    assert "hunter2" not in message and s3_env.env["AWS_SECRET_ACCESS_KEY"] not in message


def test_an_unreachable_endpoint_fails_within_seconds(s3_env, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for call in (storage.check, storage.read_bytes, storage.exists):
        start = time.monotonic()
        message = one_line_error(call, "s3://bucket/data?access_key=AKIAUSER&secret_key=hunter2")
        assert time.monotonic() - start < 15, f"{call.__name__} took {time.monotonic() - start:.1f} s"
        shown = "s3://bucket/data?access_key=***&secret_key=***"
        assert f"{shown}: cannot reach the S3 endpoint {endpoint} (from AWS_ENDPOINT_URL)" in message, message
        assert "hunter2" not in message and s3_env.env["AWS_SECRET_ACCESS_KEY"] not in message


def test_storage_never_imports_ray():
    code = "import sys, unet_ray.storage; assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
